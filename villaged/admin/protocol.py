"""The admin socket's wire format, sans-I/O: length-prefixed msgpack maps.

Every frame is ``length u32 big-endian | msgpack map``. The client sends requests
``{"op": str, "args": map}``; the server answers each, in order, with ``{"ok": true, "result":
…}`` or ``{"ok": false, "error": str, "code": str}``. One request is answered before the next is
read, so there are no request ids.

`FrameReader` takes bytes as they arrive and yields whole maps; a frame longer than its limit,
or one that is not a msgpack map, is a `ProtocolError` (the connection is then closed: the peer
is not speaking this protocol). Requests are small (the limit is `MAX_REQUEST_BYTES`); answers
may carry inspection results and have a larger limit on the client side.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

MAX_REQUEST_BYTES: Final = 64 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024
_LENGTH: Final = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer broke the framing; the message says how."""


def encode_frame(message: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Bytes in, whole maps out. ``max_bytes`` bounds one frame's payload."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self.max_bytes + _LENGTH.size:
            # Only ever one frame ahead: a client waits for each answer.
            length = self._peek_length()
            if length is None or length > self.max_bytes:
                raise ProtocolError(f"frame longer than {self.max_bytes} bytes")

    def next_message(self) -> dict[str, Any] | None:
        """The next complete map, or None until more bytes arrive."""
        length = self._peek_length()
        if length is None:
            return None
        if length > self.max_bytes:
            raise ProtocolError(f"frame longer than {self.max_bytes} bytes")
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        try:
            message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"frame is not msgpack: {exc}") from None
        if not isinstance(message, dict):
            raise ProtocolError("frame is not a map")
        return message

    @property
    def has_partial(self) -> bool:
        return bool(self._buffer)

    def _peek_length(self) -> int | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        return int(length)


def request(op: str, **args: Any) -> dict[str, Any]:
    return {"op": op, "args": args}


def ok(result: Any = None) -> dict[str, Any]:
    return {"ok": True, "result": result}


def refused(code: str, error: str) -> dict[str, Any]:
    """A refusal: ``code`` is stable (for scripts), ``error`` says why for a person."""
    return {"ok": False, "code": code, "error": error}
