"""Benchmark: the XMPP XML stream layer (villaged.xmpp.xml) on one core.

Measures, for a typical c2s chat message (body, chat state, receipt request, marker, origin-id):

- ``parse_stanzas_per_s``: stanzas parsed into elements, input fed in 16 KiB chunks (about a
  TLS record each) and drained with next_event, as the c2s driver does;
- ``parse_one_per_chunk_per_s``: the same with one stanza per receive_data call (a quiet client);
- ``serialize_stanzas_per_s``: serialize() of the parsed element;
- ``trickle_<N>k_s``: seconds to take in a start tag of N KiB one byte per receive_data call,
  which would be quadratic without the reparse gate (raw expat is shown for comparison at the
  smaller size).

Progress goes to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from xml.parsers import expat

from villaged.xmpp.xml import NEED_DATA, StanzaReceived, StreamParser, serialize

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0' "
    b"xml:lang='en'>"
)
MESSAGE = (
    "<message from='alice@localhost/phone' to='bob@localhost' type='chat' "
    "id='7c5e1a3f-52b1-4a44-9b1e-0f0d4c1e2a9b' xml:lang='en'>"
    "<body>Hello Bob, are we still on for lunch tomorrow? \U0001f44b</body>"
    "<active xmlns='http://jabber.org/protocol/chatstates'/>"
    "<request xmlns='urn:xmpp:receipts'/>"
    "<markable xmlns='urn:xmpp:chat-markers:0'/>"
    "<origin-id xmlns='urn:xmpp:sid:0' id='7c5e1a3f-52b1-4a44-9b1e-0f0d4c1e2a9b'/>"
    "</message>"
).encode()


def _parse_rate(stanzas: int, chunk_size: int) -> float:
    data = MESSAGE * stanzas
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    parser = StreamParser()
    parser.receive_data(HEADER)
    parser.next_event()
    received = 0
    start = time.perf_counter()
    for chunk in chunks:
        parser.receive_data(chunk)
        while parser.next_event() is not NEED_DATA:
            received += 1
    elapsed = time.perf_counter() - start
    if received != stanzas:
        raise SystemExit(f"parsed {received} stanzas, expected {stanzas}")
    return stanzas / elapsed


def _parse_one_per_chunk_rate(stanzas: int) -> float:
    parser = StreamParser()
    parser.receive_data(HEADER)
    parser.next_event()
    start = time.perf_counter()
    for _ in range(stanzas):
        parser.receive_data(MESSAGE)
        event = parser.next_event()
        if not isinstance(event, StanzaReceived):
            raise SystemExit(f"unexpected {event!r}")
    return stanzas / (time.perf_counter() - start)


def _serialize_rate(stanzas: int) -> float:
    parser = StreamParser()
    parser.receive_data(HEADER + MESSAGE)
    parser.next_event()
    event = parser.next_event()
    if not isinstance(event, StanzaReceived):
        raise SystemExit(f"unexpected {event!r}")
    element = event.element
    if serialize(element) != MESSAGE:
        raise SystemExit("serialize() did not reproduce the message byte for byte")
    start = time.perf_counter()
    for _ in range(stanzas):
        serialize(element)
    return stanzas / (time.perf_counter() - start)


def _trickle_seconds(kib: int) -> float:
    tag = b"<message id='" + b"x" * (kib * 1024) + b"'/>"
    parser = StreamParser()
    parser.receive_data(HEADER)
    parser.next_event()
    start = time.perf_counter()
    for i in range(len(tag)):
        parser.receive_data(tag[i : i + 1])
    elapsed = time.perf_counter() - start
    if not isinstance(parser.next_event(), StanzaReceived):
        raise SystemExit("trickled stanza not delivered")
    return elapsed


def _raw_expat_trickle_seconds(kib: int) -> float:
    tag = b"<message id='" + b"x" * (kib * 1024) + b"'/>"
    parser = expat.ParserCreate("UTF-8", "}")
    parser.Parse(HEADER, False)
    start = time.perf_counter()
    for i in range(len(tag)):
        parser.Parse(tag[i : i + 1], False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--stanzas", type=int, default=100_000)
    arguments.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    options = arguments.parse_args(argv)
    n = options.stanzas
    rounds = range(options.rounds)
    result: dict[str, float | int] = {"stanzas": n, "stanza_bytes": len(MESSAGE)}
    print("parsing (16 KiB chunks)...", file=sys.stderr)
    result["parse_stanzas_per_s"] = round(max(_parse_rate(n, 16384) for _ in rounds))
    print("parsing (one stanza per chunk)...", file=sys.stderr)
    result["parse_one_per_chunk_per_s"] = round(max(_parse_one_per_chunk_rate(n) for _ in rounds))
    print("serializing...", file=sys.stderr)
    result["serialize_stanzas_per_s"] = round(max(_serialize_rate(n) for _ in rounds))
    print("trickling large tags one byte at a time...", file=sys.stderr)
    result["trickle_64k_s"] = round(_trickle_seconds(64), 3)
    result["trickle_256k_s"] = round(_trickle_seconds(256 - 1), 3)
    result["raw_expat_trickle_64k_s"] = round(_raw_expat_trickle_seconds(64), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
