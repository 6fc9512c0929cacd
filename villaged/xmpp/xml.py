"""The XML stream layer of the XMPP core: an incremental parser with limits, and a serializer.

Theory of operation
-------------------
An XMPP stream is one long XML document (RFC 6120 §4): a stream header, any number of
first-level children (stanzas, and nonzas such as ``<starttls/>``), and finally
``</stream:stream>``. `StreamParser` reads such a document the way h11 reads HTTP: the I/O
layer hands it bytes with `receive_data` (``b""`` means the peer closed) and pulls events with
`next_event`, which returns an `Event` or `NEED_DATA`. Nothing here does I/O.

Bytes go straight to a namespace-aware expat parser whose handlers are installed once per
document. The stream header becomes `StreamOpened`; each first-level child is built with the C
`xml.etree.ElementTree.TreeBuilder` (its ``data`` method is expat's character handler while a
stanza is open, so text never passes through Python code) and becomes `StanzaReceived`; the
end of the stream element becomes `StreamClosed`; end of input becomes `ConnectionClosed`.

Everything the peer can make us hold is bounded inside the core (`XmlLimits`). Every byte is
counted against a *budget*: the stream header's bytes against ``max_header_bytes``, and from the
first byte of a first-level element (or, between elements, from the first byte expat has not
consumed yet) against ``max_stanza_bytes``. Input is fed to expat in slices that never run past
the budget, so an element that never closes is refused once it has used its budget, however
the bytes arrive, and expat never holds more than the budget. Depth and attributes per element
are checked as each start tag is reported.

Expat rescans a partial token (say, a start tag still missing its ``>``) from its start each
time more bytes arrive, so a huge tag trickled in one byte at a time costs quadratic time
(CVE-2023-52425; expat >= 2.6 works around it with "reparse deferral", which would also delay
complete stanzas, so it is turned off where it exists). While expat holds a partial token larger
than `_GATE_BYTES`, new bytes are gathered here and handed over only once they double the held
token, or carry a ``>`` (that might end it; at most `_GATE_PEEKS` times per token), or fill the
budget: rescanning stays linear overall and an ordinary large tag is still delivered promptly.

RFC 6120 §11 restricts the XML allowed on a stream. Each violation becomes an `XmlStreamError`
whose ``condition`` is the stream error the I/O layer must send (RFC 6120 §4.9.3):

- ``not-well-formed``: expat's syntax and well-formedness errors (XML and XML Namespaces);
- ``restricted-xml``: comments, processing instructions, a DOCTYPE (and so any DTD subset or
  entity declaration), references to entities other than the five predefined ones;
- ``unsupported-encoding``: an XML declaration naming an encoding other than UTF-8, or a UTF-16
  byte order mark;
- ``invalid-namespace``: a root element other than ``{http://etherx.jabber.org/streams}stream``
  (and, in framed mode, an ``open``/``close``/``stream`` element outside the framing namespace);
- ``bad-format``: non-whitespace text between stanzas (it is well-formed XML, so not
  ``not-well-formed``, but no XMPP stream may carry it; whitespace keepalives are ignored);
- ``policy-violation``: a configured limit was broken; the text names the limit.

Events parsed before an error are still returned; then `next_event` raises the error, and so
does every later call to `next_event`, ``receive_data``/``receive_message`` and `reset`: the only
way on is to send the stream error and close. Error texts quote at most a few dozen characters of
the peer's input. A caller's own mistakes (input after its end) raise RuntimeError.

Stream restarts (after STARTTLS and after SASL success) use `StreamParser.reset`: the same
object starts a new document and discards input not yet returned as events. Before answering
``<starttls/>``, check `StreamParser.has_pending_input`: data a peer sent after that command
must not be taken as having arrived over TLS.

WebSocket (RFC 7395) carries one complete element per message, with ``<open/>`` and
``<close/>`` in the framing namespace standing in for the stream header and footer.
`FramedStreamParser` shares the element building, the restrictions and the limits above, but
parses each message as a document of its own (``max_stanza_bytes`` bounds the whole message)
and reports it only once the message has ended and proved to hold exactly one element.

The serializer writes an `Element` as XMPP peers expect: namespaces become default ``xmlns``
declarations written only where an element's namespace differs from its parent's (the stream
header declares the content namespace), elements of the streams namespace use the ``stream:``
prefix, ``xml:`` is the only other prefix apart from generated ``ns0``... prefixes for the rare
namespaced attribute. Characters XML 1.0 forbids (C0 controls other than tab, LF and CR, lone
surrogates, U+FFFE and U+FFFF) are removed from text and attribute values, so the output is
always well-formed; element and attribute names are written as given.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, get_args
from xml.etree.ElementTree import TreeBuilder
from xml.parsers import expat

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import NoReturn
    from xml.etree.ElementTree import Element

__all__ = [
    "FRAMING_NS",
    "NEED_DATA",
    "STREAMS_NS",
    "STREAM_CLOSE",
    "STREAM_ERRORS_NS",
    "STREAM_ERROR_CONDITIONS",
    "XML_NS",
    "ConnectionClosed",
    "Event",
    "FramedStreamParser",
    "NeedData",
    "StanzaReceived",
    "StreamClosed",
    "StreamErrorCondition",
    "StreamOpened",
    "StreamParser",
    "XmlLimits",
    "XmlStreamError",
    "framed_close",
    "framed_open",
    "serialize",
    "stream_error",
    "stream_header",
]

XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
STREAMS_NS: Final = "http://etherx.jabber.org/streams"
STREAM_ERRORS_NS: Final = "urn:ietf:params:xml:ns:xmpp-streams"
FRAMING_NS: Final = "urn:ietf:params:xml:ns:xmpp-framing"
STREAM_CLOSE: Final = b"</stream:stream>"

# RFC 6120 §4.9.3 defined stream error conditions.
StreamErrorCondition = Literal[
    "bad-format",
    "bad-namespace-prefix",
    "conflict",
    "connection-timeout",
    "host-gone",
    "host-unknown",
    "improper-addressing",
    "internal-server-error",
    "invalid-from",
    "invalid-namespace",
    "invalid-xml",
    "not-authorized",
    "not-well-formed",
    "policy-violation",
    "remote-connection-failed",
    "reset",
    "resource-constraint",
    "restricted-xml",
    "see-other-host",
    "system-shutdown",
    "undefined-condition",
    "unsupported-encoding",
    "unsupported-feature",
    "unsupported-stanza-type",
    "unsupported-version",
]
STREAM_ERROR_CONDITIONS: Final[frozenset[str]] = frozenset(get_args(StreamErrorCondition))


class XmlStreamError(Exception):
    """The peer broke the XML rules of the stream; send ``<condition/>`` and close.

    ``condition`` is the RFC 6120 stream error condition to send; ``text`` says what happened
    (safe to log, and to send as the error's ``<text/>``).
    """

    def __init__(self, condition: StreamErrorCondition, text: str) -> None:
        super().__init__(f"{condition}: {text}")
        self.condition: StreamErrorCondition = condition
        self.text = text


@dataclass(frozen=True, slots=True)
class XmlLimits:
    """Bounds on what a peer can make the parser hold. Breaking one is a ``policy-violation``.

    ``max_stanza_bytes``: bytes in one first-level element (c2s default; s2s uses 512 KiB), or in
    one WebSocket message. ``max_depth``: element nesting, the stanza itself being depth 1.
    ``max_attributes``: attributes on one element (namespace declarations are not attributes).
    ``max_header_bytes``: bytes from the start of the stream to the end of its header,
    XML declaration included.
    """

    max_stanza_bytes: int = 262_144
    max_depth: int = 32
    max_attributes: int = 64
    max_header_bytes: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_stanza_bytes", "max_depth", "max_attributes", "max_header_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"XmlLimits.{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything `next_event` returns."""


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    """The stream header (or, in framed mode, an ``<open/>`` element) arrived.

    ``stream_ns``/``stream_prefix`` are the root element's namespace and prefix (None when it
    used a default namespace); the parser has already checked the namespace and local name, a
    caller wanting the conventional ``stream`` prefix may check it (``bad-namespace-prefix``).
    ``content_ns`` is the default namespace the header declares (``jabber:client``,
    ``jabber:server``; None when absent; always None in framed mode, where every stanza declares
    its own). ``namespaces`` maps each prefix declared on the header ("" for the default) to its
    namespace, ``attributes`` holds all attributes in Clark notation (``xml:lang`` included).
    """

    to: str | None
    from_: str | None
    id: str | None
    version: str | None
    lang: str | None
    content_ns: str | None
    stream_ns: str
    stream_prefix: str | None
    namespaces: Mapping[str, str]
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StanzaReceived(Event):
    """A complete first-level element: a stanza, or a nonza such as ``<auth/>``.

    Tags and attribute names are in Clark notation (``{jabber:client}message``, and
    ``{http://www.w3.org/XML/1998/namespace}lang`` for ``xml:lang``); ``text``/``tail`` follow
    ElementTree. On a TCP stream an unqualified stanza is in the stream's content namespace. The
    element belongs to the receiver; comparing events compares elements by identity.
    """

    element: Element


@dataclass(frozen=True, slots=True)
class StreamClosed(Event):
    """The peer closed its stream (``</stream:stream>``, or ``<close/>`` in framed mode)."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer's input ended. Returned again by every later `next_event` call."""


class NeedData(enum.Enum):
    """Type of `NEED_DATA`, which `next_event` returns when it needs more input."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA

# While expat holds a partial token bigger than this, new input is gathered and handed to it
# in doubling steps (see the module docstring); below it, rescans are cheap enough.
_GATE_BYTES: Final = 4096
# How many times per held token a chunk containing ">" may be handed over early.
_GATE_PEEKS: Final = 8
# Names expat interns, in one table shared by every parser of the process (one copy of
# ``jabber:client}message`` rather than one per connection); emptied when it grows past this.
_MAX_INTERNED: Final = 1024
_INTERNED: Final[dict[str, str]] = {}
# Expat's buffer that joins character data split across its callbacks (8 KiB by default,
# allocated per parser, so per connection); longer text arrives in pieces of this size,
# which TreeBuilder joins.
_TEXT_BUFFER_BYTES: Final = 1024
_XML_LANG: Final = "{" + XML_NS + "}lang"
_FRAMING_OPEN: Final = "{" + FRAMING_NS + "}open"
_FRAMING_CLOSE: Final = "{" + FRAMING_NS + "}close"
_FRAMING_LOOKALIKES: Final = frozenset({"open", "close", "stream"})
_UTF16_BOMS: Final = frozenset({b"\xff\xfe", b"\xfe\xff"})
# The prefix of a start tag's qualified name, matched just after its "<".
_QNAME_PREFIX: Final = re.compile(rb"([^\s/>:]+):")

# Expat errors about entities (RFC 6120 §11.1 allows only the five predefined ones); every
# other expat error is a well-formedness error.
_EXPAT_CONDITIONS: Final[dict[int, StreamErrorCondition]] = dict.fromkeys(
    (
        expat.errors.codes[message]
        for message in (
            expat.errors.XML_ERROR_UNDEFINED_ENTITY,
            expat.errors.XML_ERROR_RECURSIVE_ENTITY_REF,
            expat.errors.XML_ERROR_ASYNC_ENTITY,
            expat.errors.XML_ERROR_BINARY_ENTITY_REF,
            expat.errors.XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF,
            expat.errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING,
            expat.errors.XML_ERROR_NOT_STANDALONE,
        )
    ),
    "restricted-xml",
)


def _from_expat(exc: expat.ExpatError) -> XmlStreamError:
    condition = _EXPAT_CONDITIONS.get(exc.code, "not-well-formed")
    message = expat.errors.messages[exc.code]
    return XmlStreamError(condition, f"{message} (line {exc.lineno}, column {exc.offset})")


def _clip(text: str) -> str:
    """Peer-controlled text for an error message, shortened and quoted."""
    return repr(text if len(text) <= 64 else text[:64] + "...")


def _no_reparse_deferral(enabled: bool) -> None:
    """Stands in for SetReparseDeferralEnabled on expat builds that lack it."""


def _expanded(name: str) -> str:
    """Expat's ``ns}local`` to Clark notation ``{ns}local``."""
    return "{" + name if "}" in name else name


class _ExpatDocument:
    """What both parsers share: one expat parser per document, element building, limits.

    Subclasses set ``_stanza_level`` (the expat nesting level of the elements they report: 2
    on a TCP stream, whose level 1 is the stream element, and 1 in framed mode), say what
    happens at levels below it, and own the public input methods.
    """

    _stanza_level: int

    def __init__(self, limits: XmlLimits, outer_text: Callable[[str], None] | None) -> None:
        self.limits = limits
        self._max_stanza = limits.max_stanza_bytes
        self._max_depth = limits.max_depth
        self._max_attributes = limits.max_attributes
        # A list, not a deque: it rarely holds more than a few events, and an empty deque
        # costs ~600 bytes on every idle connection.
        self._events: list[Event] = []
        self._error: XmlStreamError | None = None
        self._eof = False
        # Expat's character handler outside first-level elements (where a TCP stream allows
        # whitespace; in framed mode expat reports no text there).
        self._outer_text = outer_text
        self._start_document()

    # -- per document ------------------------------------------------------------------------

    def _start_document(self) -> None:
        self._parser = self._new_parser()
        self._index_base = 0  # stream byte index of the parser's byte 0 (see compact())
        self._level = 0  # expat's element nesting: 1 inside the document's root element
        self._builder = TreeBuilder()
        self._received = 0  # bytes of this document accepted (fed to expat or gathered)
        self._consumed = 0  # stream byte index after the last Parse: start of held input
        self._stanza_start = 0  # byte index of the open first-level element's start tag
        self._gathered = bytearray()  # input held back from expat while gated
        self._gate = 0  # >0: expat holds a partial token of this many bytes
        self._gate_token = -1
        self._gate_peeks = 0
        self._head = b""  # the document's first bytes, until two are known

    def _new_parser(self) -> expat.XMLParserType:
        parser = expat.ParserCreate("UTF-8", "}", _INTERNED)
        parser.buffer_size = _TEXT_BUFFER_BYTES
        parser.buffer_text = True
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.CharacterDataHandler = self._outer_text
        parser.XmlDeclHandler = self._on_xml_declaration
        parser.CommentHandler = self._on_comment
        parser.ProcessingInstructionHandler = self._on_processing_instruction
        parser.StartDoctypeDeclHandler = self._on_dtd
        parser.EntityDeclHandler = self._on_dtd
        parser.UnparsedEntityDeclHandler = self._on_dtd
        parser.NotationDeclHandler = self._on_dtd
        parser.ExternalEntityRefHandler = self._on_dtd
        parser.SkippedEntityHandler = self._on_dtd
        getattr(parser, "SetReparseDeferralEnabled", _no_reparse_deferral)(False)
        return parser

    # -- expat handlers (hot path) -------------------------------------------------------------

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        level = self._level + 1
        self._level = level
        depth = level - self._stanza_level  # 0 for a first-level element
        if depth < 0:
            self._on_root_start(name, attrs)
            return
        if depth >= self._max_depth:
            raise XmlStreamError(
                "policy-violation", f"elements nested deeper than max_depth ({self._max_depth})"
            )
        if len(attrs) > self._max_attributes:
            raise XmlStreamError(
                "policy-violation",
                f"more than max_attributes ({self._max_attributes}) attributes on one element",
            )
        tag = "{" + name if "}" in name else name
        for key in attrs:
            if "}" in key:
                attrs = {_expanded(key): value for key, value in attrs.items()}
                break
        if depth:
            self._builder.start(tag, attrs)
        else:
            parser = self._parser
            self._stanza_start = parser.CurrentByteIndex + self._index_base
            builder = self._builder = TreeBuilder()
            builder.start(tag, attrs)
            parser.CharacterDataHandler = builder.data

    def _on_end(self, name: str) -> None:
        level = self._level
        self._level = level - 1
        depth = level - self._stanza_level
        if depth > 0:
            self._builder.end(name)
        elif depth == 0:
            builder = self._builder
            builder.end(name)
            self._parser.CharacterDataHandler = self._outer_text
            if len(_INTERNED) > _MAX_INTERNED:
                _INTERNED.clear()
            self._on_element(builder.close())
        else:
            self._on_root_end()

    def _on_xml_declaration(self, version: str, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() != "utf-8":
            raise XmlStreamError(
                "unsupported-encoding", f"XML declaration names {_clip(encoding)}; XMPP is UTF-8"
            )

    def _on_comment(self, data: str) -> NoReturn:
        raise XmlStreamError("restricted-xml", "XML comments are not allowed")

    def _on_processing_instruction(self, target: str, data: str) -> NoReturn:
        raise XmlStreamError(
            "restricted-xml", f"processing instruction {_clip(target)} not allowed"
        )

    def _on_dtd(self, *args: object) -> NoReturn:
        raise XmlStreamError("restricted-xml", "DTDs and entity declarations are not allowed")

    # -- subclass hooks ------------------------------------------------------------------------

    def _on_root_start(self, name: str, attrs: dict[str, str]) -> None:
        raise NotImplementedError

    def _on_root_end(self) -> None:
        raise NotImplementedError

    def _on_element(self, element: Element) -> None:
        raise NotImplementedError

    def _budget(self) -> tuple[int, str]:
        """(byte index the current budget ends at, the limit's name for errors)."""
        raise NotImplementedError

    # -- feeding -------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` within the budget; raise XmlStreamError or ExpatError on a violation."""
        if self._received < 2:
            head = self._head = (self._head + data[:2])[:2]
            if head in _UTF16_BOMS:
                raise XmlStreamError("unsupported-encoding", "UTF-16 input; XMPP is UTF-8")
        offset = 0
        size = len(data)
        while offset < size:
            end, limit = self._budget()
            room = end - self._received
            if room <= 0:
                raise XmlStreamError("policy-violation", f"{limit} exceeded")
            piece = data if offset == 0 and room >= size else data[offset : offset + room]
            offset += len(piece)
            self._received += len(piece)
            if self._gate:
                gathered = self._gathered
                gathered += piece
                if len(piece) < room and len(gathered) < self._gate:
                    if self._gate_peeks >= _GATE_PEEKS or b">" not in piece:
                        continue
                    self._gate_peeks += 1
                piece = bytes(gathered)
                gathered.clear()
            self._parse(piece)

    def _parse(self, piece: bytes) -> None:
        parser = self._parser
        parser.Parse(piece, False)
        consumed = self._consumed = max(parser.CurrentByteIndex + self._index_base, 0)
        held = self._received - consumed
        if held > _GATE_BYTES:
            if consumed != self._gate_token:
                self._gate_token = consumed
                self._gate_peeks = 0
            self._gate = held
        else:
            self._gate = 0

    def _flush_gathered(self) -> None:
        if self._gathered:
            piece = bytes(self._gathered)
            self._gathered.clear()
            self._parse(piece)

    def _fail(self, exc: XmlStreamError | expat.ExpatError) -> None:
        self._error = exc if isinstance(exc, XmlStreamError) else _from_expat(exc)

    def _raise_error(self, error: XmlStreamError) -> NoReturn:
        raise error.with_traceback(None)

    # -- output --------------------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or `NEED_DATA`; raises `XmlStreamError` once the input broke a rule."""
        if self._events:
            return self._events.pop(0)
        if self._error is not None:
            self._raise_error(self._error)
        if self._eof:
            return ConnectionClosed()
        return NEED_DATA


class StreamParser(_ExpatDocument):
    """Incremental parser for an XMPP stream over TCP/TLS (RFC 6120). See the module docstring.

    Call `receive_data` with whatever the transport delivered, then `next_event` until it
    returns `NEED_DATA`. After the event that restarts the stream (``<proceed/>`` sent, or
    ``<success/>`` sent), call `reset`.
    """

    _stanza_level = 2

    def __init__(self, limits: XmlLimits | None = None) -> None:
        super().__init__(limits or XmlLimits(), self._on_stream_text)

    def _start_document(self) -> None:
        super()._start_document()
        self._suspended = False
        self._opened = False
        # The bytes before and of the header (bounded by max_header_bytes): expat reports no
        # prefixes unless asked for them on every element, so the header's is read from here.
        self._header_bytes = bytearray()
        self._header_namespaces: dict[str, str] = {}
        self._parser.StartNamespaceDeclHandler = self._on_namespace_declaration

    def _parse(self, piece: bytes) -> None:
        if self._suspended:
            self._resume()
        elif not self._opened:
            self._header_bytes += piece
        super()._parse(piece)

    def compact(self) -> bool:
        """Release the expat parser (~12 KiB) while the stream is idle; True if it was.

        Only between stanzas with no input held: the next input then goes to a fresh parser
        that has been fed a stand-in stream header (the same element name and namespace
        declarations as the peer's), so it reads
        the following stanzas exactly as the released one would have (byte positions, and so
        the limits, continue where they were; only line numbers in expat's error texts restart).
        """
        if (
            self._suspended
            or not self._opened
            or self._level != 1
            or self._error is not None
            or self._eof
            or self._gate
            or self._received != self._consumed
        ):
            return False
        del self._parser
        self._builder = TreeBuilder()
        self._suspended = True
        return True

    def _resume(self) -> None:
        declarations = "".join(
            f" xmlns{':' + prefix if prefix else ''}='{_escape_attribute(uri)}'"
            for prefix, uri in self._header_namespaces.items()
        )
        header = f"<{self._root_qname}{declarations}>".encode()
        parser = self._new_parser()
        parser.StartElementHandler = self._on_resumed_root
        parser.Parse(header, False)
        if self._level != 1 or parser.CurrentByteIndex != len(header):
            raise RuntimeError("the stand-in stream header did not parse")  # a bug here
        parser.StartElementHandler = self._on_start
        self._parser = parser
        self._index_base = self._consumed - len(header)
        self._suspended = False

    def _on_resumed_root(self, name: str, attrs: dict[str, str]) -> None:
        self._level = 1

    def receive_data(self, data: bytes) -> None:
        """Accept bytes from the peer; ``b""`` means its input ended.

        Parsing happens here; events (and any error) are queued for `next_event`.
        """
        if self._error is not None:
            self._raise_error(self._error)
        if self._eof:
            raise RuntimeError("receive_data() after the end of input")
        try:
            if data:
                self._feed(data)
            else:
                self._eof = True
                self._flush_gathered()
        except (XmlStreamError, expat.ExpatError) as exc:
            self._fail(exc)

    def reset(self) -> None:
        """Start a new stream on the same connection (after STARTTLS or SASL success).

        Events not yet returned and input not yet parsed into events are discarded: RFC 6120
        has the peer send nothing after ``<starttls/>`` or ``<auth/>`` until it gets the answer.
        """
        if self._error is not None:
            self._raise_error(self._error)
        if self._eof:
            raise RuntimeError("reset() after the end of input")
        self._events.clear()
        self._start_document()

    @property
    def has_pending_input(self) -> bool:
        """Whether input follows the last event returned: queued events or unparsed bytes.

        Whitespace that expat has consumed does not count; a trailing partial token does (as
        does a lone trailing carriage return, which expat holds to see if a line feed follows).
        """
        return bool(self._events) or self._received > self._consumed

    def _budget(self) -> tuple[int, str]:
        if self._level >= 2:
            return self._stanza_start + self._max_stanza, self._stanza_limit_name()
        if self._opened:
            return self._consumed + self._max_stanza, self._stanza_limit_name()
        # A slice may carry stanzas after the header: it must not exceed a stanza's budget.
        header_end = self.limits.max_header_bytes
        return min(header_end, self._received + self._max_stanza), (
            f"max_header_bytes ({header_end}) for the stream header"
        )

    def _stanza_limit_name(self) -> str:
        return f"max_stanza_bytes ({self._max_stanza}) for one stanza"

    def _on_namespace_declaration(self, prefix: str | None, uri: str) -> None:
        self._header_namespaces[prefix or ""] = uri

    def _on_root_start(self, name: str, attrs: dict[str, str]) -> None:
        parser = self._parser
        parser.StartNamespaceDeclHandler = None
        namespace, found, local = name.partition("}")
        if not found:
            namespace, local = "", name
        prefix = _QNAME_PREFIX.match(self._header_bytes, parser.CurrentByteIndex + 1)
        self._header_bytes = bytearray()
        if namespace != STREAMS_NS or local != "stream":
            raise XmlStreamError(
                "invalid-namespace",
                f"stream root is {_clip(_expanded(name))}, not {{{STREAMS_NS}}}stream",
            )
        if len(attrs) > self._max_attributes:
            raise XmlStreamError(
                "policy-violation",
                f"more than max_attributes ({self._max_attributes}) attributes on the header",
            )
        attributes = {_expanded(key): value for key, value in attrs.items()}
        namespaces = self._header_namespaces
        self._root_qname = f"{prefix[1].decode()}:{local}" if prefix else local
        self._opened = True
        self._events.append(
            StreamOpened(
                to=attributes.get("to"),
                from_=attributes.get("from"),
                id=attributes.get("id"),
                version=attributes.get("version"),
                lang=attributes.get(_XML_LANG),
                content_ns=namespaces.get(""),
                stream_ns=namespace,
                stream_prefix=prefix[1].decode() if prefix else None,
                namespaces=namespaces,
                attributes=attributes,
            )
        )

    def _on_root_end(self) -> None:
        self._events.append(StreamClosed())

    def _on_element(self, element: Element) -> None:
        self._events.append(StanzaReceived(element))

    def _on_stream_text(self, data: str) -> None:
        if data.strip(" \t\r\n"):
            raise XmlStreamError(
                "bad-format", "text between stanzas (only whitespace keepalives are allowed)"
            )


class FramedStreamParser(_ExpatDocument):
    """Parser for XMPP over WebSocket (RFC 7395): each message is one complete element.

    Hand each text message (or its fragments, ``message_finished=False`` on all but the last)
    to `receive_message`; `receive_closed` when the WebSocket closed. ``<open/>`` becomes
    `StreamOpened`, ``<close/>`` `StreamClosed`, anything else `StanzaReceived`. A message that
    is not exactly one element is ``not-well-formed``; ``open``, ``close`` or ``stream`` outside
    the framing namespace is ``invalid-namespace``. Stream restarts need nothing: the client
    simply sends a new ``<open/>``.
    """

    _stanza_level = 1

    def __init__(self, limits: XmlLimits | None = None) -> None:
        super().__init__(limits or XmlLimits(), None)
        del self._parser  # each message gets its own; none is held between messages
        self._in_message = False
        self._frames: list[Element] = []

    def receive_message(self, data: bytes | str, *, message_finished: bool = True) -> None:
        """Accept (part of) one WebSocket message; its event is queued when it is finished."""
        if self._error is not None:
            self._raise_error(self._error)
        if self._eof:
            raise RuntimeError("receive_message() after the connection closed")
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if not self._in_message:
            self._start_document()
            self._in_message = True
            self._frames = []
        try:
            self._feed(data)
            if message_finished:
                self._in_message = False
                self._flush_gathered()
                self._parser.Parse(b"", True)
                del self._parser
                self._events.extend(map(self._frame_event, self._frames))
        except (XmlStreamError, expat.ExpatError) as exc:
            self._fail(exc)

    def receive_closed(self) -> None:
        """The WebSocket connection closed; a message in progress is dropped."""
        self._eof = True

    def _budget(self) -> tuple[int, str]:
        return self._max_stanza, f"max_stanza_bytes ({self._max_stanza}) for one message"

    def _on_element(self, element: Element) -> None:
        self._frames.append(element)

    def _frame_event(self, element: Element) -> Event:
        tag = element.tag
        if tag == _FRAMING_OPEN:
            attributes = dict(element.attrib)
            return StreamOpened(
                to=attributes.get("to"),
                from_=attributes.get("from"),
                id=attributes.get("id"),
                version=attributes.get("version"),
                lang=attributes.get(_XML_LANG),
                content_ns=None,
                stream_ns=FRAMING_NS,
                stream_prefix=None,
                namespaces={},
                attributes=attributes,
            )
        if tag == _FRAMING_CLOSE:
            return StreamClosed()
        if tag.rpartition("}")[2] in _FRAMING_LOOKALIKES:
            raise XmlStreamError("invalid-namespace", f"{_clip(tag)} is not in {FRAMING_NS}")
        return StanzaReceived(element)


# -- serializer ----------------------------------------------------------------------------------

_BAD_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff"
_INVALID_CHARS: Final = re.compile(f"[{_BAD_CHARS}]")
_TEXT_SPECIAL: Final = re.compile(f"[&<>\r{_BAD_CHARS}]")
_ATTR_SPECIAL: Final = re.compile(f"[&<>\"'\t\n\r{_BAD_CHARS}]")
_STREAM_PREFIX_DECLARATION: Final = f" xmlns:stream='{STREAMS_NS}'"


def _escape_text(text: str) -> str:
    if _TEXT_SPECIAL.search(text) is None:
        return text
    return (
        _INVALID_CHARS.sub("", text)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", "&#13;")
    )


def _escape_attribute(value: str) -> str:
    if _ATTR_SPECIAL.search(value) is None:
        return value
    return (
        _INVALID_CHARS.sub("", value)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&apos;")
        .replace("\t", "&#9;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
    )


def _write_attributes(write: Callable[[str], object], attrib: dict[str, str]) -> None:
    prefixes: dict[str, str] = {}
    for key, value in attrib.items():
        name = key
        if key[:1] == "{":
            namespace, _, local = key[1:].partition("}")
            if namespace == XML_NS:
                name = "xml:" + local
            elif not namespace:
                name = local
            else:
                prefix = prefixes.get(namespace)
                if prefix is None:
                    prefix = prefixes[namespace] = f"ns{len(prefixes)}"
                    write(f" xmlns:{prefix}='{_escape_attribute(namespace)}'")
                name = prefix + ":" + local
        write(" " + name + "='" + _escape_attribute(value) + "'")


def _write_element(
    write: Callable[[str], object],
    element: Element,
    parent_ns: str,
    stream_prefix: bool,
    prefixes: Mapping[str, str] | None = None,
) -> None:
    tag = element.tag
    if tag[:1] == "{":
        namespace, _, local = tag[1:].partition("}")
    else:
        namespace, local = "", tag
    if namespace == STREAMS_NS:
        name = "stream:" + local
        write("<" + name)
        if not stream_prefix:
            write(_STREAM_PREFIX_DECLARATION)
            stream_prefix = True
        inner_ns = parent_ns  # a prefixed element leaves the default namespace alone
    elif prefixes and namespace in prefixes:
        name = prefixes[namespace] + ":" + local  # declared on the stream header
        write("<" + name)
        inner_ns = parent_ns
    else:
        name = local
        write("<" + local)
        if namespace != parent_ns:
            write(" xmlns='" + _escape_attribute(namespace) + "'")
        inner_ns = namespace
    if element.attrib:
        _write_attributes(write, element.attrib)
    text = element.text
    if text or len(element):
        write(">")
        if text:
            write(_escape_text(text))
        for child in element:
            _write_element(write, child, inner_ns, stream_prefix, prefixes)
            tail = child.tail
            if tail:
                write(_escape_text(tail))
        write("</" + name + ">")
    else:
        write("/>")


def serialize(
    element: Element,
    *,
    default_ns: str | None = "jabber:client",
    prefixes: Mapping[str, str] | None = None,
) -> bytes:
    """UTF-8 XML for ``element`` (its own ``tail`` is not written).

    ``default_ns`` is the namespace in scope where the element goes: the stream's content
    namespace inside a TCP stream (whose header also declares the ``stream`` prefix), or None
    for a standalone document such as a WebSocket message, where the element declares its own
    namespace and ``xmlns:stream`` when it needs it. ``prefixes`` maps namespaces the stream
    header declares to their prefixes (``{"jabber:server:dialback": "db"}``): elements in them
    are written with the prefix (some servers match ``db:result`` literally). Forbidden
    characters are removed (see the module docstring).
    """
    parts: list[str] = []
    _write_element(parts.append, element, default_ns or "", default_ns is not None, prefixes)
    return "".join(parts).encode()


def _attributes(pairs: tuple[tuple[str, str | None], ...]) -> str:
    return "".join(f" {name}='{_escape_attribute(value)}'" for name, value in pairs if value)


def stream_header(
    *,
    from_: str,
    to: str | None = None,
    id_: str | None,
    version: str = "1.0",
    lang: str = "en",
    content_ns: str = "jabber:client",
    namespaces: Mapping[str, str] | None = None,
) -> bytes:
    """Our stream header, XML declaration included. ``namespaces`` adds prefix declarations
    (e.g. ``{"db": "jabber:server:dialback"}``); ``id_`` is None for an initiating entity."""
    declarations = "".join(
        f" xmlns:{prefix}='{_escape_attribute(uri)}'" for prefix, uri in (namespaces or {}).items()
    )
    attributes = _attributes(
        (("from", from_), ("to", to), ("id", id_), ("version", version), ("xml:lang", lang))
    )
    return (
        f"<?xml version='1.0'?><stream:stream xmlns='{_escape_attribute(content_ns)}'"
        f"{_STREAM_PREFIX_DECLARATION}{declarations}{attributes}>"
    ).encode()


def stream_error(condition: str, text: str | None = None, *, framed: bool = False) -> bytes:
    """``<stream:error>`` with ``condition`` and optional ``<text/>``. ``framed`` (WebSocket)
    declares the ``stream`` prefix on the element itself, as RFC 7395 requires."""
    if condition not in STREAM_ERROR_CONDITIONS:
        raise ValueError(f"{condition!r} is not an RFC 6120 stream error condition")
    head = f"<stream:error{_STREAM_PREFIX_DECLARATION if framed else ''}>"
    body = f"<{condition} xmlns='{STREAM_ERRORS_NS}'/>"
    if text:
        body += f"<text xmlns='{STREAM_ERRORS_NS}'>{_escape_text(text)}</text>"
    return f"{head}{body}</stream:error>".encode()


def framed_open(
    *,
    from_: str,
    id_: str | None,
    to: str | None = None,
    version: str = "1.0",
    lang: str = "en",
) -> bytes:
    """The WebSocket ``<open/>`` (RFC 7395 §3.4) a server sends in answer to the client's."""
    attributes = _attributes(
        (("from", from_), ("to", to), ("id", id_), ("version", version), ("xml:lang", lang))
    )
    return f"<open xmlns='{FRAMING_NS}'{attributes}/>".encode()


def framed_close(*, see_other_uri: str | None = None) -> bytes:
    """The WebSocket ``<close/>`` (RFC 7395 §3.6), optionally redirecting (§3.6.1)."""
    attributes = _attributes((("see-other-uri", see_other_uri),))
    return f"<close xmlns='{FRAMING_NS}'{attributes}/>".encode()
