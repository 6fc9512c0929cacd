"""The cluster link's byte format: frames of msgpack, sans-I/O.

This module owns what travels on a peer link between two villaged nodes, and nothing about how
it travels (no sockets, no clock: :mod:`villaged.cluster.links` moves the bytes).

Every frame is ``version u8 | length u32 (big-endian) | payload``, the payload one msgpack map:

* the hello, sent first by both ends: ``{"hello": node_id, "cluster": cluster_id, "inc":
  incarnation, "boot": {node: incarnation} or nil}`` -- the incarnation names this node's
  data directory (a node that lost its disk comes back as a new incarnation), ``boot`` is the
  membership it started the cluster with (see :mod:`villaged.cluster.identity`);
* a Raft message: ``{"g": group, "m": raft.message_to_wire(message)}``;
* an application frame: ``{"a": kind, "b": body}`` -- everything else nodes tell each other
  (forwarded proposals and their outcomes, session locations, stanzas for a session). The
  body is plain msgpack data; its meaning and its checks belong to whoever handles ``kind``.

:class:`FrameDecoder` is fed bytes as they arrive (``receive_data``; ``b""`` is the end of
input) and hands out one decoded frame at a time (``next_frame`` → :class:`Hello`,
:class:`Envelope`, :data:`NEED_DATA` or :data:`CLOSED`). Its buffer is bounded: a length above
``max_frame_bytes`` is refused from the header alone, before the payload is buffered. Anything
a peer gets wrong raises a :class:`WireError` subclass (all remote errors: the link closes and
the peer reconnects); after that the decoder stays in the error state.

The default frame limit is the Raft core's ``max_snapshot_bytes`` (an ``InstallSnapshot``
carries a whole snapshot in one message) plus slack for the envelope.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from villaged.cluster.raft import (
    Message,
    RemoteProtocolError,
    message_from_wire,
    message_to_wire,
)

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER",
    "NEED_DATA",
    "WIRE_VERSION",
    "AppFrame",
    "BadVersionError",
    "Envelope",
    "FrameDecoder",
    "FrameTooLargeError",
    "Hello",
    "MalformedFrameError",
    "Signal",
    "TruncatedFrameError",
    "WireError",
    "encode_app_frame",
    "encode_envelope",
    "encode_frame",
    "encode_hello",
]

WIRE_VERSION: Final = 1
HEADER: Final = struct.Struct(">BI")
#: 64 MiB of snapshot (the core's default ``max_snapshot_bytes``) plus 1 MiB for the rest.
DEFAULT_MAX_FRAME_BYTES: Final = (64 << 20) + (1 << 20)


class Signal(enum.Enum):
    NEED_DATA = "need-data"  # feed more bytes
    CLOSED = "closed"  # the peer ended its side cleanly, between frames


NEED_DATA: Final = Signal.NEED_DATA
CLOSED: Final = Signal.CLOSED


class WireError(Exception):
    """The peer sent bytes that are not a valid frame: close the link."""


class BadVersionError(WireError):
    pass


class FrameTooLargeError(WireError):
    pass


class MalformedFrameError(WireError):
    pass


class TruncatedFrameError(WireError):
    """The input ended in the middle of a frame."""


@dataclass(frozen=True, slots=True)
class Hello:
    node_id: str
    cluster_id: str
    incarnation: str = ""
    #: The membership the sender started the cluster with ({node: incarnation}), if any.
    boot: dict[str, str] | None = field(default=None, compare=False)

    def same_node(self, node_id: str, cluster_id: str) -> bool:
        """Whether this hello is from ``node_id`` of ``cluster_id`` (whatever its incarnation)."""
        return self.node_id == node_id and self.cluster_id == cluster_id


@dataclass(frozen=True, slots=True)
class Envelope:
    group: str
    message: Message


@dataclass(frozen=True, slots=True)
class AppFrame:
    kind: str
    body: Any


Frame = Hello | Envelope | AppFrame

#: An application frame's kind: short, printable, dotted (``"fwd.propose"``).
MAX_KIND_CHARS: Final = 32


def encode_frame(
    payload: dict[str, Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """One frame around ``payload``; ValueError (a local error) if it exceeds the limit."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    if len(body) > max_frame_bytes:
        raise ValueError(f"frame of {len(body)} bytes exceeds max_frame_bytes ({max_frame_bytes})")
    return HEADER.pack(WIRE_VERSION, len(body)) + body


def encode_hello(
    node_id: str, cluster_id: str, incarnation: str = "", *, boot: Any = None
) -> bytes:
    return encode_frame({"hello": node_id, "cluster": cluster_id, "inc": incarnation, "boot": boot})


def encode_envelope(message: Message, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    return encode_frame(
        {"g": message.group, "m": message_to_wire(message)}, max_frame_bytes=max_frame_bytes
    )


def encode_app_frame(
    kind: str, body: Any, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """ValueError if ``kind`` is not a valid kind or the frame exceeds the limit."""
    _check_kind(kind)
    return encode_frame({"a": kind, "b": body}, max_frame_bytes=max_frame_bytes)


def _check_kind(kind: object) -> None:
    if (
        not isinstance(kind, str)
        or not 0 < len(kind) <= MAX_KIND_CHARS
        or not all(c.isalnum() or c in "._-" for c in kind)
        or not kind.isascii()
    ):
        raise ValueError(f"bad application frame kind {kind!r}")


class FrameDecoder:
    """Bytes in, frames out; see the module docstring."""

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be at least 1")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._eof = False
        self._error: WireError | None = None

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data after the end of input")
            return
        if data:
            self._buffer += data
        else:
            self._eof = True

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> Frame | Signal:
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except WireError as exc:
            self._error = exc
            raise

    def _next_frame(self) -> Frame | Signal:
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            if self._eof:
                if buffer:
                    raise TruncatedFrameError("input ended inside a frame header")
                return CLOSED
            return NEED_DATA
        version, length = HEADER.unpack_from(buffer)
        if version != WIRE_VERSION:
            raise BadVersionError(f"wire version {version}, expected {WIRE_VERSION}")
        if length > self.max_frame_bytes:
            raise FrameTooLargeError(
                f"frame of {length} bytes exceeds max_frame_bytes ({self.max_frame_bytes})"
            )
        end = HEADER.size + length
        if len(buffer) < end:
            if self._eof:
                raise TruncatedFrameError("input ended inside a frame")
            return NEED_DATA
        payload = bytes(buffer[HEADER.size : end])
        del buffer[:end]
        return parse_payload(payload)


#: Items of any one msgpack array or map in a frame (entries of an AppendEntries are arrays
#: of four; voters of a snapshot; the envelope's own fields).
MAX_ARRAY_LEN: Final = 8192
MAX_MAP_LEN: Final = 64


def parse_payload(payload: bytes) -> Frame:
    """A frame's payload as a :class:`Hello`, an :class:`Envelope` or an :class:`AppFrame`."""
    try:
        # Bounded containers: a frame of tiny entries must not become millions of objects
        # (the raft layer takes at most 4096 entries a message anyway).
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedFrameError(f"payload is not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedFrameError("payload is not a map")
    if "hello" in obj:
        node_id, cluster_id = obj.get("hello"), obj.get("cluster")
        incarnation, boot = obj.get("inc", ""), obj.get("boot")
        if not isinstance(node_id, str) or not node_id or not isinstance(cluster_id, str):
            raise MalformedFrameError("hello needs string 'hello' and 'cluster'")
        if (
            not isinstance(incarnation, str)
            or len(incarnation) > 64
            or not (incarnation == "" or incarnation.isalnum())
        ):
            raise MalformedFrameError("hello has a bad 'inc'")
        if boot is not None and not (
            isinstance(boot, dict)
            and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 64
                for k, v in boot.items()
            )
        ):
            raise MalformedFrameError("hello has a bad 'boot'")
        return Hello(node_id, cluster_id, incarnation, boot)
    if "a" in obj:
        kind = obj.get("a")
        try:
            _check_kind(kind)
        except ValueError as exc:
            raise MalformedFrameError(str(exc)) from None
        assert isinstance(kind, str)
        return AppFrame(kind, obj.get("b"))
    group, wire = obj.get("g"), obj.get("m")
    if not isinstance(group, str) or not isinstance(wire, dict):
        raise MalformedFrameError("frame is neither a hello nor a raft envelope")
    try:
        message = message_from_wire(wire)
    except RemoteProtocolError as exc:
        raise MalformedFrameError(str(exc)) from exc
    if message.group != group:
        raise MalformedFrameError(f"envelope group {group!r} != message group {message.group!r}")
    return Envelope(group, message)
