"""JIDs per RFC 7622: parsing, PRECIS preparation and comparison.

Localparts are prepared with the PRECIS UsernameCaseMapped profile plus RFC 7622's extra
prohibitions; resourceparts with OpaqueString; domainparts are lower-cased, NFC-normalised and
checked label by label (IDNA for non-ASCII labels, IP literals allowed). Every part is bounded at
1023 octets. A `JID` is always in canonical form, so equality is string equality.
"""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from dataclasses import dataclass

from precis_i18n import get_profile

_MAX_PART = 1023
_CACHED_TEXT = 128  # longer texts are parsed every time, so the cache stays small
# RFC 7622 §3.3.1: characters a localpart must not contain even though PRECIS allows them.
_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
_USERNAME = get_profile("UsernameCaseMapped")
_OPAQUE = get_profile("OpaqueString")


class JIDError(ValueError):
    """The string is not a valid JID; the message says which part and why."""


@dataclass(frozen=True, slots=True, order=True)
class JID:
    """A JID in canonical form. ``local`` and ``resource`` are "" when absent."""

    local: str
    domain: str
    resource: str = ""

    @classmethod
    def parse(cls, text: str) -> JID:
        """Parse and prepare ``text``; JIDError says which part is wrong and why.

        PRECIS preparation is the costly part of routing a stanza, and the same few JIDs
        recur: results for short texts are kept in a bounded cache (JIDs are immutable)."""
        if len(text) <= _CACHED_TEXT and cls is JID:
            return _parse_cached(text)
        return cls._parse(text)

    @classmethod
    def parse_or_none(cls, text: str | None) -> JID | None:
        """`parse`, or None for a missing or invalid JID (an attribute a peer may leave out)."""
        if not text:
            return None
        try:
            return cls.parse(text)
        except JIDError:
            return None

    @classmethod
    def _parse(cls, text: str) -> JID:
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise JIDError("JID is not valid UTF-8 text") from exc
        slash = text.find("/")
        if slash >= 0:
            bare, resource = text[:slash], text[slash + 1 :]
            if not resource:
                raise JIDError("empty resourcepart after '/'")
        else:
            bare, resource = text, ""
        at = bare.find("@")
        if at >= 0:
            local, domain = bare[:at], bare[at + 1 :]
            if not local:
                raise JIDError("empty localpart before '@'")
        else:
            local, domain = "", bare
        return cls(
            local=prepare_localpart(local) if local else "",
            domain=prepare_domainpart(domain),
            resource=prepare_resourcepart(resource) if resource else "",
        )

    @property
    def bare(self) -> JID:
        return JID(self.local, self.domain) if self.resource else self

    @property
    def is_bare(self) -> bool:
        return not self.resource

    def with_resource(self, resource: str) -> JID:
        return JID(self.local, self.domain, prepare_resourcepart(resource))

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.local else self.domain
        return f"{text}/{self.resource}" if self.resource else text


_parse_cached = functools.lru_cache(maxsize=4096)(JID._parse)


def prepare_localpart(local: str) -> str:
    try:
        prepared = _USERNAME.enforce(local)
    except UnicodeError as exc:
        raise JIDError(f"localpart {local!r} is not allowed: {_reason(exc)}") from exc
    bad = sorted(set(prepared) & _LOCAL_FORBIDDEN)
    if bad:
        raise JIDError(f"localpart {local!r} contains forbidden character {bad[0]!r}")
    _check_length("localpart", prepared)
    return prepared


def prepare_resourcepart(resource: str) -> str:
    try:
        prepared = _OPAQUE.enforce(resource)
    except UnicodeError as exc:
        raise JIDError(f"resourcepart {resource!r} is not allowed: {_reason(exc)}") from exc
    _check_length("resourcepart", prepared)
    return prepared


def prepare_domainpart(domain: str) -> str:
    if domain.startswith("[") and domain.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(domain[1:-1]).compressed}]"
        except ValueError as exc:
            raise JIDError(f"domainpart {domain!r} is not an IPv6 literal") from exc
    prepared = unicodedata.normalize("NFC", domain).lower()
    if prepared.endswith("."):
        prepared = prepared[:-1]
    if not prepared:
        raise JIDError("empty domainpart")
    _check_length("domainpart", prepared)
    for label in prepared.split("."):
        _check_label(domain, label)
    return prepared


def _check_label(domain: str, label: str) -> None:
    if not label:
        raise JIDError(f"domainpart {domain!r} has an empty label")
    try:
        ascii_label = label.encode("idna") if not label.isascii() else label.encode()
    except UnicodeError as exc:
        raise JIDError(f"domainpart {domain!r}: label {label!r} is not a valid IDN") from exc
    if len(ascii_label) > 63:
        raise JIDError(f"domainpart {domain!r}: label {label!r} is longer than 63 octets")
    if label.isascii() and not all(c.isalnum() or c == "-" for c in label):
        raise JIDError(f"domainpart {domain!r}: label {label!r} has a character not allowed")
    if label.startswith("-") or label.endswith("-"):
        raise JIDError(f"domainpart {domain!r}: label {label!r} starts or ends with '-'")


def _check_length(part: str, value: str) -> None:
    if len(value.encode()) > _MAX_PART:
        raise JIDError(f"{part} is longer than {_MAX_PART} octets")


def _reason(exc: UnicodeError) -> str:
    # precis_i18n puts the rule that failed (e.g. "DISALLOWED/spaces") in the reason.
    return str(getattr(exc, "reason", exc))
