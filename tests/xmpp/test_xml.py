"""The XML stream layer: bytes in, events out; elements in, bytes out. No mocks."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Literal, TypeAlias

import pytest

from villaged.xmpp.xml import (
    FRAMING_NS,
    NEED_DATA,
    STREAM_CLOSE,
    STREAMS_NS,
    XML_NS,
    ConnectionClosed,
    Event,
    FramedStreamParser,
    StanzaReceived,
    StreamClosed,
    StreamOpened,
    StreamParser,
    XmlLimits,
    XmlStreamError,
    framed_close,
    framed_open,
    serialize,
    stream_error,
    stream_header,
)

Tree: TypeAlias = tuple[
    str, tuple[tuple[str, str], ...], str | None, str | None, tuple["Tree", ...]
]

CLIENT = "jabber:client"
LANG = "{" + XML_NS + "}lang"
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0' "
    b"xml:lang='en'>"
)
STANZAS = (
    b"<message to='juliet@example.org' type='chat' id='m1' xml:lang='fr'>"
    b"<body>caf\xc3\xa9 &amp; cr\xc3\xa8me &lt;3 \xf0\x9f\x98\x80</body>"
    b"<data:x xmlns:data='urn:example:data' data:kind='k'>one<i>two</i>three</data:x>"
    b"</message>"
    b"\n  \t"
    b"<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"
    b" "
    b"<stream:features/>"
)
FULL_STREAM = HEADER + STANZAS + b"</stream:stream>"


@pytest.fixture(autouse=True, params=["as is", "compacted"])
def compacting(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs twice: the second time the parser releases its expat parser before
    each input whenever it may (as the c2s driver does on idle streams), which must change
    nothing a caller can see."""
    if request.param == "compacted":
        receive_data = StreamParser.receive_data

        def compact_first(self: StreamParser, data: bytes) -> None:
            self.compact()
            receive_data(self, data)

        monkeypatch.setattr(StreamParser, "receive_data", compact_first)


def tree(element: ET.Element) -> Tree:
    return (
        element.tag,
        tuple(sorted(element.attrib.items())),
        element.text,
        element.tail,
        tuple(tree(child) for child in element),
    )


Normal: TypeAlias = Event | tuple[Literal["stanza"], Tree]


def normal(event: Event) -> Normal:
    """Events with elements made comparable by value (StanzaReceived compares by identity)."""
    if isinstance(event, StanzaReceived):
        return ("stanza", tree(event.element))
    return event


def drain(parser: StreamParser | FramedStreamParser) -> list[Normal]:
    events: list[Normal] = []
    while True:
        event = parser.next_event()
        if event is NEED_DATA:
            return events
        events.append(normal(event))
        if isinstance(event, ConnectionClosed):
            return events


def kinds(events: list[Normal]) -> list[str]:
    names = {
        StreamOpened: "opened",
        StreamClosed: "closed",
        ConnectionClosed: "eof",
        tuple: "stanza",
    }
    return [names[type(event)] for event in events]


def parse(*chunks: bytes, limits: XmlLimits | None = None) -> list[Normal]:
    parser = StreamParser(limits)
    events: list[Normal] = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += drain(parser)
    return events


def stream_error_of(*chunks: bytes, limits: XmlLimits | None = None) -> XmlStreamError:
    parser = StreamParser(limits)
    with pytest.raises(XmlStreamError) as caught:  # noqa: PT012 — the error may come from either
        for chunk in chunks:
            parser.receive_data(chunk)
            drain(parser)
    return caught.value


def stanza_tree(events: list[Normal], index: int = 1) -> Tree:
    event = events[index]
    assert isinstance(event, tuple)
    return event[1]


def pending(parser: StreamParser) -> bool:
    """`has_pending_input`, read through a call so that mypy does not narrow it for good."""
    return parser.has_pending_input


def opened(parser: StreamParser) -> StreamParser:
    parser.receive_data(HEADER)
    assert isinstance(parser.next_event(), StreamOpened)
    return parser


EXPECTED_HEADER = StreamOpened(
    to="example.org",
    from_=None,
    id=None,
    version="1.0",
    lang="en",
    content_ns=CLIENT,
    stream_ns=STREAMS_NS,
    stream_prefix="stream",
    namespaces={"": CLIENT, "stream": STREAMS_NS},
    attributes={"to": "example.org", "version": "1.0", LANG: "en"},
)
EXPECTED_STANZAS: list[Normal] = [
    (
        "stanza",
        (
            "{jabber:client}message",
            (("id", "m1"), ("to", "juliet@example.org"), ("type", "chat"), (LANG, "fr")),
            None,
            None,
            (
                ("{jabber:client}body", (), "café & crème <3 😀", None, ()),
                (
                    "{urn:example:data}x",
                    (("{urn:example:data}kind", "k"),),
                    "one",
                    None,
                    (("{jabber:client}i", (), "two", "three", ()),),  # unprefixed: default ns
                ),
            ),
        ),
    ),
    (
        "stanza",
        (
            "{jabber:client}iq",
            (("id", "p1"), ("type", "get")),
            None,
            None,
            (("{urn:xmpp:ping}ping", (), None, None, ()),),
        ),
    ),
    ("stanza", ("{http://etherx.jabber.org/streams}features", (), None, None, ())),
]


# -- a whole stream ------------------------------------------------------------------------------


def test_full_stream_in_one_chunk() -> None:
    events = parse(FULL_STREAM, b"")
    assert events == [
        EXPECTED_HEADER,
        *EXPECTED_STANZAS,
        StreamClosed(),
        ConnectionClosed(),
    ]


def test_full_stream_one_byte_at_a_time_gives_the_same_events() -> None:
    one_by_one = [FULL_STREAM[i : i + 1] for i in range(len(FULL_STREAM))]
    assert parse(*one_by_one, b"") == parse(FULL_STREAM, b"")


@pytest.mark.parametrize("split", range(len(HEADER) + 1, len(HEADER) + 120, 7))
def test_any_two_way_split_gives_the_same_events(split: int) -> None:
    assert parse(FULL_STREAM[:split], FULL_STREAM[split:]) == parse(FULL_STREAM)


def test_multibyte_utf8_split_across_chunks() -> None:
    stanza = "<message to='ré@example.org'><body>é😀€</body></message>".encode()
    for split in range(1, len(stanza)):
        events = parse(HEADER, stanza[:split], stanza[split:])
        _, attrs, _, _, (body,) = stanza_tree(events)
        assert attrs == (("to", "ré@example.org"),)
        assert body[2] == "é😀€"


def test_next_event_without_input_needs_data() -> None:
    parser = StreamParser()
    assert parser.next_event() is NEED_DATA
    parser.receive_data(HEADER[:10])
    assert parser.next_event() is NEED_DATA


def test_stanza_is_reported_as_soon_as_it_is_complete() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<presence/><message><body>hi</body></mess")
    first = parser.next_event()
    assert isinstance(first, StanzaReceived)
    assert first.element.tag == "{jabber:client}presence"
    assert parser.next_event() is NEED_DATA
    parser.receive_data(b"age>")
    second = parser.next_event()
    assert isinstance(second, StanzaReceived)
    assert second.element.findtext("{jabber:client}body") == "hi"


# -- the stream header ---------------------------------------------------------------------------


def test_header_with_default_streams_namespace_has_no_prefix() -> None:
    events = parse(b"<stream xmlns='http://etherx.jabber.org/streams' from='a.example' id='x'>")
    assert events == [
        StreamOpened(
            to=None,
            from_="a.example",
            id="x",
            version=None,
            lang=None,
            content_ns=STREAMS_NS,  # declared, so reported; the caller rejects it
            stream_ns=STREAMS_NS,
            stream_prefix=None,
            namespaces={"": STREAMS_NS},
            attributes={"from": "a.example", "id": "x"},
        )
    ]


def test_header_with_another_prefix_and_extra_namespaces() -> None:
    (header,) = parse(
        b"<foo:stream xmlns:foo='http://etherx.jabber.org/streams' xmlns='jabber:server' "
        b"xmlns:db='jabber:server:dialback' version='1.0'>"
    )
    assert isinstance(header, StreamOpened)
    assert header.stream_prefix == "foo"
    assert header.content_ns == "jabber:server"
    assert header.namespaces == {
        "foo": STREAMS_NS,
        "": "jabber:server",
        "db": "jabber:server:dialback",
    }


def test_stanzas_take_the_header_content_namespace() -> None:
    events = parse(
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:server'>"
        b"<message/><db:result xmlns:db='jabber:server:dialback'/><x xmlns=''/>"
    )
    assert [stanza_tree(events, i)[0] for i in (1, 2, 3)] == [
        "{jabber:server}message",
        "{jabber:server:dialback}result",
        "x",
    ]


def test_self_closing_stream_opens_and_closes() -> None:
    events = parse(b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>")
    assert kinds(events) == ["opened", "closed"]


def test_utf8_byte_order_mark_is_accepted() -> None:
    (header,) = parse(b"\xef\xbb\xbf" + HEADER)
    assert isinstance(header, StreamOpened)
    assert header.stream_prefix == "stream"


@pytest.mark.parametrize(
    "header",
    [
        b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'>",
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streamz'>",
        b"<stream xmlns='jabber:client'>",
        b"<stream>",
        b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
    ],
)
def test_wrong_stream_element_is_invalid_namespace(header: bytes) -> None:
    assert stream_error_of(header).condition == "invalid-namespace"


# -- whitespace and text between stanzas ---------------------------------------------------------


def test_whitespace_keepalives_are_ignored() -> None:
    events = parse(HEADER, b" ", b"\n", b"\t\r\n  ", b"<presence/>", b"   ")
    assert kinds(events) == ["opened", "stanza"]


def test_endless_keepalives_do_not_use_up_the_stanza_budget() -> None:
    limits = XmlLimits(max_stanza_bytes=64)
    events = parse(HEADER, *[b" \n" * 20] * 50, b"<presence/>", limits=limits)
    assert kinds(events) == ["opened", "stanza"]


@pytest.mark.parametrize("text", [b"hello", b"  x  ", b"&amp;", b"<![CDATA[ ]]>x"])
def test_text_between_stanzas_is_bad_format(text: bytes) -> None:
    error = stream_error_of(HEADER + b"<presence/>" + text + b"<presence/>")
    assert error.condition == "bad-format"


def test_cdata_inside_a_stanza_is_fine() -> None:
    events = parse(HEADER, b"<message><body><![CDATA[<b>&amp;</b>]]></body></message>")
    assert stanza_tree(events)[4][0][2] == "<b>&amp;</b>"


# -- restricted XML ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"<!DOCTYPE stream>" + HEADER,
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]>" + HEADER,
        b"<!DOCTYPE x SYSTEM 'file:///etc/passwd'>" + HEADER,
        b"<!-- hello -->" + HEADER,
        HEADER + b"<!-- keepalive? -->",
        HEADER + b"<message><!-- hidden --></message>",
        b"<?xml-stylesheet href='x'?>" + HEADER,
        HEADER + b"<?php echo 1; ?>",
        HEADER + b"<message><?pi data?></message>",
        HEADER + b"<message><body>&foo;</body></message>",
        HEADER + b"<message to='&ent;'/>",
        HEADER + b"<message><body>&nbsp;</body></message>",
    ],
)
def test_restricted_xml(data: bytes) -> None:
    assert stream_error_of(data).condition == "restricted-xml"


def test_predefined_entities_and_character_references_are_fine() -> None:
    events = parse(
        HEADER, b"<message id='&quot;&apos;'><body>&lt;&gt;&amp;&#233;&#x1F600;</body></message>"
    )
    message = stanza_tree(events)
    assert message[1] == (("id", "\"'"),)
    assert message[4][0][2] == "<>&é😀"


# -- malformed input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"<message></iq>",
        HEADER + b"<message><body>unclosed</message>",
        HEADER + b"<foo:bar/>",
        HEADER + b"<message to='a' to='b'/>",
        HEADER + b"<message to=a/>",
        HEADER + b"<message><body>\x01</body></message>",
        HEADER + b"<message><body>&#1;</body></message>",
        HEADER + b"<message><body>\xc3\x28</body></message>",
        HEADER + b"<message><body>\xff</body></message>",
        HEADER + b"<?xml version='1.0'?>",
        HEADER + b"</stream:stream><presence/>",
        HEADER + b"</stream:stream>junk",
        b"hello <stream/>",
        b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns:stream='x'>",
        b"<a:b:c/>",
    ],
)
def test_malformed_xml_is_not_well_formed(data: bytes) -> None:
    assert stream_error_of(data).condition == "not-well-formed"


def test_trailing_whitespace_after_stream_close_is_fine() -> None:
    events = parse(HEADER + b"</stream:stream>", b"\n  ", b"")
    assert kinds(events) == ["opened", "closed", "eof"]


@pytest.mark.parametrize(
    "data",
    [
        b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:],
        b"<?xml version='1.0' encoding='utf-16'?>" + HEADER[21:],
        "<?xml version='1.0'?><stream:stream/>".encode("utf-16"),
        b"\xfe\xff" + "<stream:stream/>".encode("utf-16-be"),
    ],
)
def test_encodings_other_than_utf8_are_unsupported(data: bytes) -> None:
    assert stream_error_of(data).condition == "unsupported-encoding"


def test_utf16_byte_order_mark_split_over_chunks_is_unsupported() -> None:
    assert stream_error_of(b"\xff", b"\xfe<\x00").condition == "unsupported-encoding"


def test_declared_utf8_in_any_case_is_fine() -> None:
    (header,) = parse(b"<?xml version='1.0' encoding='UTF-8'?>" + HEADER[21:])
    assert isinstance(header, StreamOpened)


# -- limits --------------------------------------------------------------------------------------


def test_never_ending_stanza_is_refused_once_it_used_its_budget() -> None:
    """The parser stops accepting within one chunk of the limit: it cannot be made to buffer."""
    limit = 8192
    parser = opened(StreamParser(XmlLimits(max_stanza_bytes=limit)))
    fed = 0
    chunk = b"x" * 1000
    parser.receive_data(b"<message><body>")
    fed += len(b"<message><body>")
    with pytest.raises(XmlStreamError) as caught:  # noqa: PT012
        while fed < 10 * limit:
            parser.receive_data(chunk)
            fed += len(chunk)
            assert parser.next_event() is NEED_DATA
    assert caught.value.condition == "policy-violation"
    assert "max_stanza_bytes (8192)" in caught.value.text
    assert limit < fed <= limit + len(chunk)


def test_never_ending_start_tag_is_refused_too() -> None:
    parser = opened(StreamParser(XmlLimits(max_stanza_bytes=20_000)))
    parser.receive_data(b"<message to='")
    with pytest.raises(XmlStreamError, match="max_stanza_bytes"):  # noqa: PT012
        for _ in range(100):
            parser.receive_data(b"a" * 1000)
            assert parser.next_event() is NEED_DATA


def test_oversized_stanza_in_one_huge_chunk() -> None:
    limits = XmlLimits(max_stanza_bytes=1000)
    data = HEADER + b"<presence/><message><body>" + b"y" * 10_000_000 + b"</body></message>"
    parser = StreamParser(limits)
    parser.receive_data(data)
    assert isinstance(parser.next_event(), StreamOpened)
    assert isinstance(parser.next_event(), StanzaReceived)
    with pytest.raises(XmlStreamError, match=r"policy-violation: max_stanza_bytes \(1000\)"):
        parser.next_event()


@pytest.mark.parametrize("extra", [0, 1])
def test_stanza_limit_is_exact(extra: int) -> None:
    limit = 200
    stanza = b"<message><body>" + b"z" * (limit - 32 + extra) + b"</body></message>"
    assert len(stanza) == limit + extra
    chunks = (HEADER, stanza, b"<presence/>")
    if extra:
        assert stream_error_of(*chunks, limits=XmlLimits(max_stanza_bytes=limit)).condition == (
            "policy-violation"
        )
    else:
        events = parse(*chunks, limits=XmlLimits(max_stanza_bytes=limit))
        assert len(events) == 3
        # and the same when everything arrives together
        assert parse(b"".join(chunks), limits=XmlLimits(max_stanza_bytes=limit)) == events


def test_budget_is_per_stanza() -> None:
    limits = XmlLimits(max_stanza_bytes=100)
    stanza = b"<message><body>" + b"w" * 60 + b"</body></message>"
    events = parse(HEADER + stanza * 50, limits=limits)
    assert len(events) == 51


def test_small_stanza_limit_holds_within_the_header_slice() -> None:
    limits = XmlLimits(max_stanza_bytes=64, max_header_bytes=4096)
    error = stream_error_of(
        HEADER + b"<message><body>" + b"v" * 200 + b"</body></message>", limits=limits
    )
    assert error.condition == "policy-violation"


def test_header_limit() -> None:
    limits = XmlLimits(max_header_bytes=len(HEADER))
    assert len(parse(HEADER, limits=limits)) == 1
    longer = HEADER.replace(b"to='example.org'", b"to='example.orgx'")
    error = stream_error_of(longer, limits=limits)
    assert error.condition == "policy-violation"
    assert "max_header_bytes" in error.text


def test_never_ending_header_is_refused() -> None:
    limits = XmlLimits(max_header_bytes=1000)
    error = stream_error_of(b"<stream:stream to='", *[b"b" * 100] * 20, limits=limits)
    assert error.condition == "policy-violation"


def test_prolog_counts_toward_the_header_limit() -> None:
    header = HEADER[len(b"<?xml version='1.0'?>") :]
    limits = XmlLimits(max_header_bytes=len(header) + 10)
    assert kinds(parse(b" " * 10 + header, limits=limits)) == ["opened"]
    assert stream_error_of(b" " * 11 + header, limits=limits).condition == "policy-violation"


def test_depth_limit_counts_from_the_stanza() -> None:
    limits = XmlLimits(max_depth=3)
    ok = b"<message><a><b/></a></message>"
    assert len(parse(HEADER, ok, limits=limits)) == 2
    too_deep = b"<message><a><b><c/></b></a></message>"
    error = stream_error_of(HEADER, too_deep, limits=limits)
    assert error.condition == "policy-violation"
    assert "max_depth (3)" in error.text


def test_attribute_limit() -> None:
    limits = XmlLimits(max_attributes=3)
    ok = b"<message a='1' b='2' xml:lang='en' xmlns:x='urn:x'><x:y x:c='3' d='4' e='5'/></message>"
    assert len(parse(HEADER, ok, limits=limits)) == 2
    error = stream_error_of(
        HEADER, b"<message><x a='1' b='2' c='3' d='4'/></message>", limits=limits
    )
    assert error.condition == "policy-violation"
    assert "max_attributes (3)" in error.text


def test_attribute_limit_applies_to_the_header() -> None:
    limits = XmlLimits(max_attributes=3)
    assert stream_error_of(HEADER.replace(b"to=", b"a='1' to="), limits=limits).condition == (
        "policy-violation"
    )


@pytest.mark.parametrize(
    "field", ["max_stanza_bytes", "max_depth", "max_attributes", "max_header_bytes"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_limits_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        XmlLimits(**{field: value})  # type: ignore[arg-type]


def test_default_limits() -> None:
    assert XmlLimits() == XmlLimits(
        max_stanza_bytes=262_144, max_depth=32, max_attributes=64, max_header_bytes=4096
    )


# -- large tags trickled in (the reparse gate) ---------------------------------------------------


def test_large_tag_trickled_byte_by_byte_arrives_intact() -> None:
    value = "é" * 10_000  # 20,000 bytes of attribute value
    tag = f"<message id='{value}'><body>b</body></message>".encode()
    parser = opened(StreamParser())
    for i in range(len(tag)):
        parser.receive_data(tag[i : i + 1])
        if i < len(tag) - 1:
            assert parser.next_event() is NEED_DATA
    event = parser.next_event()
    assert isinstance(event, StanzaReceived)
    assert event.element.get("id") == value


def test_large_tag_completed_by_a_small_chunk_is_delivered_at_once() -> None:
    tag = b"<message id='" + b"q" * 30_000 + b"'/>"
    parser = opened(StreamParser())
    parser.receive_data(tag[:-5])
    assert parser.next_event() is NEED_DATA
    parser.receive_data(tag[-5:])
    assert isinstance(parser.next_event(), StanzaReceived)


def test_gt_signs_inside_a_large_attribute_cannot_force_endless_rescans() -> None:
    """Each chunk with a ">" may be handed over early only a few times per held token; after
    that, the token waits until the input gathered behind it doubles what expat holds."""
    held = b"<message id='" + b"a" * 5000
    parser = opened(StreamParser())
    parser.receive_data(held)
    for _ in range(40):
        parser.receive_data(b">")
        assert parser.next_event() is NEED_DATA
    parser.receive_data(b"'/>")
    assert parser.next_event() is NEED_DATA  # early hand-overs used up: gathered, not parsed
    parser.receive_data(b" " * len(held))  # e.g. keepalives or the next stanzas
    event = parser.next_event()
    assert isinstance(event, StanzaReceived)
    assert event.element.get("id") == "a" * 5000 + ">" * 40


def test_gathered_bytes_are_parsed_at_end_of_input() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<message id='" + b"c" * 6000)
    for _ in range(20):
        parser.receive_data(b">")  # spends the early hand-overs
    parser.receive_data(b"'/>")  # gathered, not parsed
    assert parser.next_event() is NEED_DATA
    assert pending(parser)
    parser.receive_data(b"")
    assert kinds(drain(parser)) == ["stanza", "eof"]


def test_gathered_bytes_are_parsed_at_the_end_of_a_framed_message() -> None:
    parser = FramedStreamParser()
    parser.receive_message(
        b"<presence xmlns='jabber:client' id='" + b"c" * 6000, message_finished=False
    )
    for _ in range(20):
        parser.receive_message(b">", message_finished=False)
    parser.receive_message(b"'/>")
    event = parser.next_event()
    assert isinstance(event, StanzaReceived)
    assert event.element.get("id") == "c" * 6000 + ">" * 20


@pytest.mark.parametrize(("size", "delivered"), [(10_000, True), (10_001, False)])
def test_gathered_bytes_are_handed_over_when_the_budget_is_full(size: int, delivered: bool) -> None:
    limits = XmlLimits(max_stanza_bytes=10_000)
    head = b"<m id='" + b"d" * 5000
    tail = b"'/>"
    filler = b"d" * (size - len(head) - 20 - len(tail))
    parser = opened(StreamParser(limits))
    parser.receive_data(head)
    for _ in range(20):
        parser.receive_data(b">")  # spends the early hand-overs
    for i in range(0, len(filler), 1000):
        parser.receive_data(filler[i : i + 1000])  # gathered: no ">", below the doubling
    assert parser.next_event() is NEED_DATA
    if delivered:
        parser.receive_data(tail)  # fills the budget exactly: expat must look now
        assert kinds(drain(parser)) == ["stanza"]
    else:
        parser.receive_data(tail)
        with pytest.raises(XmlStreamError, match="max_stanza_bytes"):
            drain(parser)


def test_many_distinct_element_names() -> None:
    children = b"".join(b"<e%d/>" % i for i in range(1500))
    events = parse(HEADER, b"<message>" + children + b"</message>", b"<presence/>")
    assert len(stanza_tree(events)[4]) == 1500
    assert stanza_tree(events, 2)[0] == "{jabber:client}presence"


# -- errors stick --------------------------------------------------------------------------------


def test_events_before_an_error_are_delivered_then_the_error_sticks() -> None:
    parser = StreamParser()
    parser.receive_data(HEADER + b"<presence/><message><!-- x --></message><presence/>")
    assert isinstance(parser.next_event(), StreamOpened)
    assert isinstance(parser.next_event(), StanzaReceived)
    for _ in range(3):
        with pytest.raises(XmlStreamError) as caught:
            parser.next_event()
        assert caught.value.condition == "restricted-xml"
    with pytest.raises(XmlStreamError, match="restricted-xml"):
        parser.receive_data(b"<presence/>")
    with pytest.raises(XmlStreamError, match="restricted-xml"):
        parser.receive_data(b"")
    with pytest.raises(XmlStreamError, match="restricted-xml"):
        parser.reset()


def test_error_texts_quote_little_of_the_input() -> None:
    long_name = b"p" * 10_000
    error = stream_error_of(HEADER + b"<?" + long_name + b" x?>")
    assert error.condition == "restricted-xml"
    assert len(error.text) < 120
    assert "ppp..." in error.text
    error = stream_error_of(b"<x:stream xmlns:x='" + long_name[:3000] + b"'>")
    assert error.condition == "invalid-namespace"
    assert len(error.text) < 150


def test_error_text_says_where() -> None:
    error = stream_error_of(HEADER + b"\n<message></iq>")
    assert error.text.startswith("mismatched tag (line 2, column")
    assert str(error).startswith("not-well-formed: mismatched tag")


# -- end of input --------------------------------------------------------------------------------


def test_end_of_input_mid_stanza() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<presence/><message><body>hal")
    parser.receive_data(b"")
    assert isinstance(parser.next_event(), StanzaReceived)
    for _ in range(3):
        assert parser.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError):
        parser.receive_data(b"more")
    with pytest.raises(RuntimeError):
        parser.receive_data(b"")
    with pytest.raises(RuntimeError):
        parser.reset()


def test_end_of_input_before_anything() -> None:
    assert parse(b"") == [ConnectionClosed()]


# -- restarts ------------------------------------------------------------------------------------


def test_reset_starts_a_new_stream() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    starttls = parser.next_event()
    assert isinstance(starttls, StanzaReceived)
    assert not pending(parser)
    parser.reset()
    assert parser.next_event() is NEED_DATA
    parser.receive_data(HEADER + b"<presence/>")  # a fresh XML declaration is fine again
    assert parser.next_event() == EXPECTED_HEADER
    assert isinstance(parser.next_event(), StanzaReceived)


def test_reset_applies_the_header_limits_again() -> None:
    limits = XmlLimits(max_header_bytes=len(HEADER))
    parser = StreamParser(limits)
    for _ in range(3):
        parser.receive_data(HEADER)
        assert isinstance(parser.next_event(), StreamOpened)
        parser.reset()


def test_data_after_starttls_is_pending_and_discarded_by_reset() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get'/>")
    assert isinstance(parser.next_event(), StanzaReceived)
    assert pending(parser)  # an injected stanza: refuse to go on
    parser.reset()
    assert not pending(parser)
    assert parser.next_event() is NEED_DATA


def test_partial_token_after_a_command_is_pending() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/> <pres")
    assert isinstance(parser.next_event(), StanzaReceived)
    assert pending(parser)


def test_whitespace_after_a_command_is_not_pending() -> None:
    parser = opened(StreamParser())
    parser.receive_data(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/> \n ")
    assert isinstance(parser.next_event(), StanzaReceived)
    assert not pending(parser)


# -- WebSocket framing (RFC 7395) ----------------------------------------------------------------

WS_OPEN = (
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.org' version='1.0'"
    " xml:lang='en'/>"
)


def framed(*messages: bytes | str, limits: XmlLimits | None = None) -> list[Normal]:
    parser = FramedStreamParser(limits)
    events: list[Normal] = []
    for message in messages:
        parser.receive_message(message)
        events += drain(parser)
    return events


def framed_error_of(*messages: bytes | str, limits: XmlLimits | None = None) -> XmlStreamError:
    with pytest.raises(XmlStreamError) as caught:
        framed(*messages, limits=limits)
    return caught.value


def test_framed_open_stanza_close() -> None:
    events = framed(
        WS_OPEN,
        "<message xmlns='jabber:client' to='a@example.org'><body>hé</body></message>",
        b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
    )
    assert events == [
        StreamOpened(
            to="example.org",
            from_=None,
            id=None,
            version="1.0",
            lang="en",
            content_ns=None,
            stream_ns=FRAMING_NS,
            stream_prefix=None,
            namespaces={},
            attributes={"to": "example.org", "version": "1.0", LANG: "en"},
        ),
        (
            "stanza",
            (
                "{jabber:client}message",
                (("to", "a@example.org"),),
                None,
                None,
                (("{jabber:client}body", (), "hé", None, ()),),
            ),
        ),
        StreamClosed(),
    ]


def test_framed_restart_is_just_another_open() -> None:
    events = framed(WS_OPEN, "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>", WS_OPEN)
    assert kinds(events) == ["opened", "stanza", "opened"]


def test_framed_message_in_fragments() -> None:
    parser = FramedStreamParser()
    parser.receive_message("<message xmlns='jabber:client'><bo", message_finished=False)
    assert parser.next_event() is NEED_DATA
    parser.receive_message(b"dy>x</body></message>", message_finished=False)
    assert parser.next_event() is NEED_DATA  # not before the message has ended
    parser.receive_message("  ")
    event = parser.next_event()
    assert isinstance(event, StanzaReceived)
    assert event.element.findtext("{jabber:client}body") == "x"


def test_framed_whitespace_and_declaration_around_the_element_are_fine() -> None:
    events = framed("<?xml version='1.0'?>\n<presence xmlns='jabber:client'/>\n")
    assert stanza_tree(events, 0)[0] == "{jabber:client}presence"


def test_framed_stanza_without_namespace_stays_unqualified() -> None:
    assert stanza_tree(framed("<message/>"), 0)[0] == "message"


@pytest.mark.parametrize(
    "message",
    [
        "<presence xmlns='jabber:client'/><presence xmlns='jabber:client'/>",
        "<presence xmlns='jabber:client'/>trailing",
        "<presence xmlns='jabber:client'>",
        "",
        "   ",
        "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:client'>",
        "<presence xmlns='jabber:client'><bad></presence>",
    ],
)
def test_framed_message_must_be_exactly_one_element(message: str) -> None:
    assert framed_error_of(message).condition == "not-well-formed"


def test_framed_two_elements_deliver_nothing() -> None:
    parser = FramedStreamParser()
    parser.receive_message("<presence xmlns='jabber:client'/>", message_finished=False)
    parser.receive_message("<presence xmlns='jabber:client'/>")
    with pytest.raises(XmlStreamError, match="junk after document element"):
        parser.next_event()


@pytest.mark.parametrize(
    "message",
    [
        "<open xmlns='jabber:client' to='example.org' version='1.0'/>",
        "<open to='example.org' version='1.0'/>",
        "<close xmlns='http://etherx.jabber.org/streams'/>",
        "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>",
    ],
)
def test_framing_elements_in_the_wrong_namespace(message: str) -> None:
    assert framed_error_of(message).condition == "invalid-namespace"


@pytest.mark.parametrize(
    ("message", "condition"),
    [
        ("<message xmlns='jabber:client'><!-- c --></message>", "restricted-xml"),
        ("<!DOCTYPE m><message/>", "restricted-xml"),
        ("<message xmlns='jabber:client'>&x;</message>", "restricted-xml"),
        (b"<?xml version='1.0' encoding='latin1'?><message/>", "unsupported-encoding"),
        ("<message xmlns='jabber:client'>\udc80</message>", "not-well-formed"),
    ],
)
def test_framed_restrictions(message: str | bytes, condition: str) -> None:
    assert framed_error_of(message).condition == condition


def test_framed_limits() -> None:
    limits = XmlLimits(max_stanza_bytes=100, max_depth=2)
    body = "<message xmlns='jabber:client'><body>" + "x" * 46 + "</body></message>"
    assert len(body) == 100
    assert len(framed(body, body, limits=limits)) == 2
    error = framed_error_of(
        "<message xmlns='jabber:client'><body>" + "x" * 70 + "</body></message>", limits=limits
    )
    assert "max_stanza_bytes (100) for one message" in error.text
    assert framed_error_of("<m><a><b/></a></m>", limits=limits).condition == "policy-violation"


def test_framed_limit_spans_fragments() -> None:
    parser = FramedStreamParser(XmlLimits(max_stanza_bytes=100))
    parser.receive_message("<message xmlns='jabber:client'><body>", message_finished=False)
    parser.receive_message("y" * 80, message_finished=False)
    with pytest.raises(XmlStreamError, match="policy-violation"):
        parser.next_event()


def test_framed_error_sticks() -> None:
    parser = FramedStreamParser()
    parser.receive_message("<a><b></a>")
    with pytest.raises(XmlStreamError):
        parser.next_event()
    with pytest.raises(XmlStreamError):
        parser.receive_message("<presence xmlns='jabber:client'/>")
    with pytest.raises(XmlStreamError):
        parser.next_event()


def test_framed_connection_closed() -> None:
    parser = FramedStreamParser()
    parser.receive_message(WS_OPEN)
    parser.receive_message("<message xmlns='jabber:client'>", message_finished=False)
    parser.receive_closed()
    assert isinstance(parser.next_event(), StreamOpened)
    assert parser.next_event() == ConnectionClosed()
    assert parser.next_event() == ConnectionClosed()
    with pytest.raises(RuntimeError):
        parser.receive_message(WS_OPEN)


# -- serializer ----------------------------------------------------------------------------------


def message(body: str, **attrs: str) -> ET.Element:
    element = ET.Element("{jabber:client}message", attrs)
    ET.SubElement(element, "{jabber:client}body").text = body
    return element


def reparse(data: bytes) -> Tree:
    events = parse(HEADER, data)
    return stanza_tree(events)


def test_serialize_typical_message() -> None:
    element = message("Hi there", to="juliet@example.org", type="chat", id="m1")
    assert serialize(element) == (
        b"<message to='juliet@example.org' type='chat' id='m1'><body>Hi there</body></message>"
    )


def test_serialize_standalone_declares_the_namespace() -> None:
    assert serialize(message("x"), default_ns=None) == (
        b"<message xmlns='jabber:client'><body>x</body></message>"
    )


def test_serialize_escaping_round_trips() -> None:
    tricky = "<&>'\" ]]> café 😀 \t tab\nnew line\r\nCRLF"
    element = message(tricky, id=tricky, to="a@b")
    element[0].tail = tricky
    data = serialize(element)
    assert b"]]>" not in data
    assert reparse(data) == tree(element)


def test_serialize_attribute_escapes() -> None:
    element = ET.Element("{jabber:client}x", {"a": "&<>\"'\t\n\r"})
    assert serialize(element) == b"<x a='&amp;&lt;&gt;&quot;&apos;&#9;&#10;&#13;'/>"


def test_serialize_text_escapes() -> None:
    element = ET.Element("{jabber:client}x")
    element.text = "a&b<c>d\re\"f'g"
    assert serialize(element) == b"<x>a&amp;b&lt;c&gt;d&#13;e\"f'g</x>"


def test_parsed_stanzas_survive_serialize_and_parse() -> None:
    parser = opened(StreamParser())
    parser.receive_data(STANZAS)
    for expected in EXPECTED_STANZAS:
        event = parser.next_event()
        assert isinstance(event, StanzaReceived)
        assert ("stanza", reparse(serialize(event.element))) == expected


def test_namespace_declarations_only_where_the_namespace_changes() -> None:
    iq = ET.Element("{jabber:client}iq", {"type": "result", "id": "r1"})
    query = ET.SubElement(iq, "{jabber:iq:roster}query", {"ver": "3"})
    item = ET.SubElement(query, "{jabber:iq:roster}item", {"jid": "romeo@example.net"})
    ET.SubElement(item, "{jabber:iq:roster}group").text = "Friends"
    ET.SubElement(query, "{jabber:client}note")
    ET.SubElement(query, "plain")
    assert serialize(iq) == (
        b"<iq type='result' id='r1'><query xmlns='jabber:iq:roster' ver='3'>"
        b"<item jid='romeo@example.net'><group>Friends</group></item>"
        b"<note xmlns='jabber:client'/><plain xmlns=''/></query></iq>"
    )
    assert reparse(serialize(iq)) == tree(iq)


def test_serialize_unqualified_element() -> None:
    assert serialize(ET.Element("x"), default_ns=None) == b"<x/>"
    assert serialize(ET.Element("x")) == b"<x xmlns=''/>"
    assert serialize(ET.Element("{}x"), default_ns=None) == b"<x/>"


def test_serialize_xml_lang_and_namespaced_attributes() -> None:
    element = ET.Element(
        "{jabber:client}message",
        {LANG: "de", "{urn:a}one": "1", "{urn:b}two": "2", "{urn:a}three": "3", "{}plain": "p"},
    )
    data = serialize(element)
    assert data == (
        b"<message xml:lang='de' xmlns:ns0='urn:a' ns0:one='1' xmlns:ns1='urn:b' ns1:two='2'"
        b" ns0:three='3' plain='p'/>"
    )
    assert reparse(data)[1] == (
        ("plain", "p"),
        ("{http://www.w3.org/XML/1998/namespace}lang", "de"),
        ("{urn:a}one", "1"),
        ("{urn:a}three", "3"),
        ("{urn:b}two", "2"),
    )


def test_serialize_stream_namespace_uses_the_stream_prefix() -> None:
    features = ET.Element(f"{{{STREAMS_NS}}}features")
    ET.SubElement(features, "{urn:ietf:params:xml:ns:xmpp-tls}starttls")
    mechanisms = ET.SubElement(features, "{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms")
    ET.SubElement(mechanisms, "{urn:ietf:params:xml:ns:xmpp-sasl}mechanism").text = "PLAIN"
    ET.SubElement(features, "{jabber:client}inline")
    assert serialize(features) == (
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism>"
        b"</mechanisms><inline/></stream:features>"
    )
    standalone = serialize(features, default_ns=None)
    assert standalone.startswith(
        b"<stream:features xmlns:stream='http://etherx.jabber.org/streams'><starttls"
    )
    assert b"<inline xmlns='jabber:client'/>" in standalone
    nested = ET.Element("{jabber:client}x")
    nested.append(ET.Element(f"{{{STREAMS_NS}}}y"))
    nested[0].append(ET.Element(f"{{{STREAMS_NS}}}z"))
    assert serialize(nested, default_ns=None) == (
        b"<x xmlns='jabber:client'><stream:y xmlns:stream='http://etherx.jabber.org/streams'>"
        b"<stream:z/></stream:y></x>"
    )
    assert framed(standalone.decode())[0] == ("stanza", tree(features))


def test_serialize_removes_characters_xml_forbids() -> None:
    element = ET.Element("{jabber:client}message", {"id": "a\x00b\x1fc\ud800d\ufffe"})
    body = ET.SubElement(element, "{jabber:client}body")
    body.text = "x\x01y\x08z\x0b\x0c\uffff!\tok\n"
    body.tail = "\x7f\x85 kept"
    data = serialize(element)
    assert data == (b"<message id='abcd'><body>xyz!\tok\n</body>\x7f\xc2\x85 kept</message>")
    assert reparse(data)[4][0][2] == "xyz!\tok\n"


def test_serialize_omits_empty_text_and_root_tail() -> None:
    element = ET.Element("{jabber:client}presence")
    element.text = ""
    element.tail = "ignored"
    assert serialize(element) == b"<presence/>"


def test_stream_header_bytes() -> None:
    assert stream_header(from_="example.org", id_="s1") == (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
        b"xmlns:stream='http://etherx.jabber.org/streams' from='example.org' id='s1' "
        b"version='1.0' xml:lang='en'>"
    )
    s2s = stream_header(
        from_="a.example",
        to="b.example",
        id_=None,
        lang="de",
        content_ns="jabber:server",
        namespaces={"db": "jabber:server:dialback"},
    )
    assert s2s == (
        b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
        b"xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
        b"from='a.example' to='b.example' version='1.0' xml:lang='de'>"
    )
    (header,) = parse(s2s)
    assert isinstance(header, StreamOpened)
    assert (header.from_, header.to, header.lang, header.content_ns) == (
        "a.example",
        "b.example",
        "de",
        "jabber:server",
    )


def test_our_header_and_close_parse_as_a_stream() -> None:
    data = stream_header(from_="x'y", id_="<&>") + serialize(message("hi")) + STREAM_CLOSE
    events = parse(data)
    assert isinstance(events[0], StreamOpened)
    assert (events[0].from_, events[0].id) == ("x'y", "<&>")
    assert stanza_tree(events) == tree(message("hi"))
    assert events[2] == StreamClosed()


def test_stream_error_bytes() -> None:
    assert stream_error("not-well-formed") == (
        b"<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error>"
    )
    assert stream_error("policy-violation", "too <big> & bad", framed=True) == (
        b"<stream:error xmlns:stream='http://etherx.jabber.org/streams'>"
        b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>too &lt;big&gt; &amp; bad</text>"
        b"</stream:error>"
    )
    (event,) = framed(stream_error("conflict", "x", framed=True))
    assert event == (
        "stanza",
        (
            f"{{{STREAMS_NS}}}error",
            (),
            None,
            None,
            (
                ("{urn:ietf:params:xml:ns:xmpp-streams}conflict", (), None, None, ()),
                ("{urn:ietf:params:xml:ns:xmpp-streams}text", (), "x", None, ()),
            ),
        ),
    )


def test_stream_error_rejects_unknown_conditions() -> None:
    with pytest.raises(ValueError, match="not an RFC 6120 stream error condition"):
        stream_error("made-up")


def test_framed_open_and_close_bytes() -> None:
    opening = framed_open(from_="example.org", id_="abc", lang="fr")
    assert opening == (
        b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='example.org' id='abc' "
        b"version='1.0' xml:lang='fr'/>"
    )
    assert framed_close() == b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"
    assert framed_close(see_other_uri="wss://b.example/ws?a=1&b=2") == (
        b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing' "
        b"see-other-uri='wss://b.example/ws?a=1&amp;b=2'/>"
    )
    events = framed(opening, framed_close(see_other_uri="wss://x"))
    assert isinstance(events[0], StreamOpened)
    assert (events[0].from_, events[0].id, events[0].lang) == ("example.org", "abc", "fr")
    assert events[1] == StreamClosed()


def test_compact_only_between_stanzas_with_nothing_held() -> None:
    parser = StreamParser()
    assert not parser.compact()  # no stream yet
    opened(parser)
    parser.receive_data(b"<message><body>half")
    assert not parser.compact()  # inside a stanza
    parser.receive_data(b"</body></message><pre")
    assert not parser.compact()  # a partial start tag is held
    parser.receive_data(b"sence/>")
    assert [kinds(drain(parser))] == [["stanza", "stanza"]]
    assert parser.compact()
    assert not parser.compact()  # already released
    # Positions continue: the next stanza still has exactly its own budget.
    limits = XmlLimits(max_stanza_bytes=40)
    parser = opened(StreamParser(limits))
    parser.receive_data(b"<presence/>")
    assert parser.compact()
    parser.receive_data(b"<message><body>" + b"x" * 8 + b"</body></message>")  # 40 bytes
    parser.receive_data(b"<message><body>" + b"x" * 9 + b"</body></message>")  # 41 bytes
    with pytest.raises(XmlStreamError, match="max_stanza_bytes"):
        drain(parser)
