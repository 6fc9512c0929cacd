"""Where to connect for a remote domain: the ordered connection candidates for s2s.

Theory of operation
-------------------
`resolve` answers "where do I connect to reach DOMAIN's XMPP server?" with an ordered list of
`Candidate` (host name, port, direct TLS or STARTTLS), best first; the connector tries them in
order and, whichever it uses, authenticates the peer as DOMAIN (never as the SRV target).

1. A static peers table (operator config, tests) is consulted first, for the exact domain.
2. A domain that is an IP literal is its own address, on port 5269.
3. Otherwise two SRV queries run concurrently: ``_xmpps-server._tcp.DOMAIN`` (direct TLS,
   XEP-0368) and ``_xmpp-server._tcp.DOMAIN`` (STARTTLS, RFC 6120 §3.2.1). Their records are
   merged into one set and ordered as RFC 2782 says (`order_srv`): priority ascending, and
   within a priority a weighted random order. A set that consists of the target ``.`` only says
   the service is decidedly not available there; if nothing else is left, that is an error and
   there is no fallback to the domain's address.
4. No SRV records at all: the domain's own A/AAAA, port 5269, STARTTLS (RFC 6120 §3.2.2),
   provided it has an address at all; otherwise the domain cannot be reached.

Candidates carry host names; the connector resolves them to addresses (happy eyeballs).
Everything is bounded: records per SRV set, candidates returned, and the length and syntax of
every name (records with targets that are not host names are dropped). Timeouts belong to the
caller (``with trio.fail_after(...)``); the DNS library's own per-query lifetime also applies.

The ordering (`order_srv`, `merge_srv`) is pure: DNS answers and randomness are passed in.
`DnsLookup` is the thin layer that asks DNS (dnspython's async resolver on its trio backend);
tests pass a fake `Lookup` instead.
"""

from __future__ import annotations

import ipaddress
import random
import re
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.resolver
import trio

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "DEFAULT_PORT",
    "MAX_CANDIDATES",
    "MAX_SRV_RECORDS",
    "Candidate",
    "DnsLookup",
    "Lookup",
    "LookupFailedError",
    "ResolutionError",
    "SrvRecord",
    "StaticPeer",
    "merge_srv",
    "order_srv",
    "resolve",
]

#: RFC 6120 §3.2.2: the port to try when a domain has no SRV records.
DEFAULT_PORT: Final = 5269
#: At most this many candidates come back from `resolve`.
MAX_CANDIDATES: Final = 16
#: At most this many records of one SRV answer are considered (lowest priorities kept).
MAX_SRV_RECORDS: Final = 64

XMPPS_SERVER: Final = "_xmpps-server._tcp."
XMPP_SERVER: Final = "_xmpp-server._tcp."

_MAX_NAME_LENGTH: Final = 253
_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NO_SERVICE: Final = "."
_ADDRESS_RDATA: Final = (dns.rdtypes.IN.A.A, dns.rdtypes.IN.AAAA.AAAA)


class ResolutionError(Exception):
    """``domain`` has no usable s2s candidates.

    ``temporary`` is true when DNS failed (timeout, SERVFAIL) rather than answered: worth a retry
    later, whereas a definite answer (no such domain, service not available) is not.
    """

    def __init__(self, domain: str, reason: str, *, temporary: bool = False) -> None:
        super().__init__(f"cannot resolve s2s for {domain!r}: {reason}")
        self.domain = domain
        self.reason = reason
        self.temporary = temporary


class LookupFailedError(Exception):
    """A `Lookup` got no answer (timeout, SERVFAIL, no reachable name server)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """Connect to ``host`` (a host name or IP literal) on ``port``; TLS from the first byte
    when ``direct_tls``, else STARTTLS."""

    host: str
    port: int
    direct_tls: bool = False


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV record; ``target`` is an absolute name without the final dot, or ``"."``."""

    priority: int
    weight: int
    port: int
    target: str


@dataclass(frozen=True, slots=True)
class _Offer:
    """An SRV record together with the kind of service it came from."""

    record: SrvRecord
    direct_tls: bool

    @property
    def priority(self) -> int:
        return self.record.priority

    @property
    def weight(self) -> int:
        return self.record.weight


#: A static peers table entry: a full candidate, or ``(host, port)`` for STARTTLS.
StaticPeer = Candidate | tuple[str, int]


class Lookup(Protocol):
    """DNS as `resolve` needs it. No records (NXDOMAIN, or no data) is an empty sequence; no
    answer at all raises `LookupFailedError`."""

    async def srv(self, name: str) -> Sequence[SrvRecord]: ...

    async def addresses(self, name: str) -> Sequence[str]: ...


class _RandomSource(Protocol):
    def randint(self, a: int, b: int) -> int: ...


class _Weighted(Protocol):
    @property
    def priority(self) -> int: ...

    @property
    def weight(self) -> int: ...


W = TypeVar("W", bound=_Weighted)


# --- the ordering (pure) ------------------------------------------------------------------------


def order_srv(records: Iterable[W], rng: _RandomSource) -> list[W]:
    """RFC 2782's order: priority ascending; within one priority, repeatedly pick a record with
    probability proportional to its weight (zero-weight records have a small chance, and come
    first among equals), until none are left."""
    by_priority: dict[int, list[W]] = {}
    for record in records:
        by_priority.setdefault(record.priority, []).append(record)
    ordered: list[W] = []
    for priority in sorted(by_priority):
        # RFC 2782: "all those with weight 0 are placed at the beginning of the list".
        remaining = sorted(by_priority[priority], key=lambda r: r.weight != 0)
        while remaining:
            running_sums = list(accumulate(r.weight for r in remaining))
            pick = rng.randint(0, running_sums[-1])
            # The first record whose running sum reaches the pick (there is one: pick <= total).
            ordered.append(remaining.pop(bisect_left(running_sums, pick)))
    return ordered


def merge_srv(
    domain: str,
    direct_tls: Sequence[SrvRecord],
    starttls: Sequence[SrvRecord],
    rng: _RandomSource,
) -> list[Candidate] | None:
    """The candidates of both SRV sets, merged and ordered (XEP-0368 §2); None when both sets
    are empty (the caller falls back to the domain's address). Raises `ResolutionError` when the
    records leave nothing to connect to (service decidedly not available, or no usable target).
    """
    if not direct_tls and not starttls:
        return None
    offers: list[_Offer] = []
    for records, is_direct in ((direct_tls, True), (starttls, False)):
        kept = sorted(records, key=lambda r: r.priority)[:MAX_SRV_RECORDS]
        offers += [
            _Offer(r, is_direct)
            for r in kept
            if r.target != _NO_SERVICE and 0 < r.port <= 0xFFFF and _is_host_name(r.target)
        ]
    if not offers:
        if any(r.target == _NO_SERVICE for r in (*direct_tls, *starttls)):
            raise ResolutionError(domain, "SRV says the service is not available (target '.')")
        raise ResolutionError(domain, "no SRV record has a usable target and port")
    candidates: list[Candidate] = []
    for offer in order_srv(offers, rng):
        candidate = Candidate(_normalize(offer.record.target), offer.record.port, offer.direct_tls)
        if candidate not in candidates:
            candidates.append(candidate)
        if len(candidates) == MAX_CANDIDATES:
            break
    return candidates


# --- the lookup ---------------------------------------------------------------------------------


async def resolve(
    domain: str,
    *,
    static: Mapping[str, StaticPeer] | None = None,
    lookup: Lookup | None = None,
    rng: _RandomSource | None = None,
) -> list[Candidate]:
    """The ordered candidates for ``domain`` (see the module docstring); never empty.

    ``static`` maps domains to their fixed peer (checked first, exact domain); ``lookup``
    defaults to `DnsLookup` on the system's resolver configuration; ``rng`` defaults to a fresh
    `random.Random`. Bound the call with ``trio.fail_after``. Raises `ResolutionError`.
    """
    name = _normalize(domain)
    if static is not None and name in static:
        peer = static[name]
        return [peer if isinstance(peer, Candidate) else Candidate(peer[0], peer[1])]
    if _is_ip_literal(name):
        return [Candidate(name.strip("[]"), DEFAULT_PORT)]
    if not _is_host_name(name):
        raise ResolutionError(domain, "not a valid host name")
    if rng is None:
        rng = random.Random()  # SRV weights only spread load; nothing secret depends on it
    try:
        if lookup is None:
            lookup = await trio.to_thread.run_sync(DnsLookup)  # reads /etc/resolv.conf
        direct_tls, starttls = await _query_srv_pair(lookup, name)
        candidates = merge_srv(domain, direct_tls, starttls, rng)
        if candidates is not None:
            return candidates
        if not await lookup.addresses(name):
            raise ResolutionError(domain, "no SRV records and no A/AAAA records")
    except* LookupFailedError as group:
        reasons = "; ".join(str(e) for e in _leaves(group))
        raise ResolutionError(domain, f"DNS lookup failed: {reasons}", temporary=True) from None
    return [Candidate(name, DEFAULT_PORT)]


async def _query_srv_pair(
    lookup: Lookup, name: str
) -> tuple[Sequence[SrvRecord], Sequence[SrvRecord]]:
    """Both SRV sets (direct TLS, STARTTLS), queried concurrently."""
    answers: dict[str, Sequence[SrvRecord]] = {}

    async def query(prefix: str) -> None:
        answers[prefix] = await lookup.srv(prefix + name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query, XMPPS_SERVER)
        nursery.start_soon(query, XMPP_SERVER)
    return answers[XMPPS_SERVER], answers[XMPP_SERVER]


def _leaves(group: BaseExceptionGroup[LookupFailedError]) -> list[LookupFailedError]:
    leaves: list[LookupFailedError] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves += _leaves(error)
        else:
            leaves.append(error)
    return leaves


class DnsLookup:
    """`Lookup` through dnspython's async resolver, on its trio backend (cancellable).

    Constructing it reads the system resolver configuration (``/etc/resolv.conf``), a blocking
    file read: construct it at startup or in a worker thread. Pass ``resolver`` to use another
    configuration (name servers, per-query lifetime).
    """

    def __init__(self, resolver: dns.asyncresolver.Resolver | None = None) -> None:
        try:
            self._resolver = resolver or dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as error:
            raise LookupFailedError(f"no DNS resolver configuration: {error}") from error
        self._backend = dns.asyncbackend.get_backend("trio")

    async def srv(self, name: str) -> list[SrvRecord]:
        answer = await self._query(name, dns.rdatatype.SRV)
        records: list[SrvRecord] = []
        for rdata in answer:
            if not isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
                continue
            target = rdata.target
            text = _NO_SERVICE if target == dns.name.root else target.to_text(omit_final_dot=True)
            records.append(SrvRecord(rdata.priority, rdata.weight, rdata.port, text))
        return records

    async def addresses(self, name: str) -> list[str]:
        found: dict[dns.rdatatype.RdataType, list[str]] = {}

        async def query(rdtype: dns.rdatatype.RdataType) -> None:
            answer = await self._query(name, rdtype)
            found[rdtype] = [r.address for r in answer if isinstance(r, _ADDRESS_RDATA)]

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(query, dns.rdatatype.AAAA)
                nursery.start_soon(query, dns.rdatatype.A)
        except* LookupFailedError as group:
            raise LookupFailedError("; ".join(str(e) for e in _leaves(group))) from None
        return found[dns.rdatatype.AAAA] + found[dns.rdatatype.A]

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> list[dns.rdata.Rdata]:
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(name),
                rdtype,
                raise_on_no_answer=False,
                backend=self._backend,
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as error:  # timeout, SERVFAIL, no name server...
            raise LookupFailedError(f"{dns.rdatatype.to_text(rdtype)} {name}: {error}") from error
        return list(answer.rrset or ())


# --- names --------------------------------------------------------------------------------------


def _normalize(domain: str) -> str:
    return domain.rstrip(".").lower()


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _is_host_name(name: str) -> bool:
    """An ASCII (A-label) host name: LDH labels, at least two, top label not all digits (so no
    IP address in disguise)."""
    name = name.rstrip(".").lower()
    if not name or len(name) > _MAX_NAME_LENGTH:
        return False
    labels = name.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)
