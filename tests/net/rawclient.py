"""A small XMPP client for tests that need to send exactly the bytes they choose (bad input,
protocol corners). Real sockets, real TLS; parsing with the project's own XML parser."""

from __future__ import annotations

import base64
import contextlib
import ssl
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

import trio

from villaged.xmpp import xml

if TYPE_CHECKING:
    from pathlib import Path

STREAMS = "http://etherx.jabber.org/streams"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


def header(domain: str = "localhost") -> bytes:
    return (
        f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{STREAMS}' "
        f"to='{domain}' version='1.0'>"
    ).encode()


class RawClient:
    def __init__(
        self,
        stream: trio.abc.Stream,
        tcp: trio.SocketStream,
        ca_file: Path,
        domain: str = "localhost",
    ) -> None:
        self.stream = stream
        self.tcp = tcp
        self.ca_file = ca_file
        self.domain = domain  # the server's domain: stream headers and the TLS name
        self.parser = xml.StreamParser()
        self.closed = False
        self.features: ET.Element | None = None  # the last stream features (after login)

    @classmethod
    async def connect(
        cls,
        port: int,
        ca_file: Path,
        *,
        direct_tls: bool = False,
        local_address: str | None = None,
        domain: str = "localhost",
    ) -> RawClient:
        """Connect to the node on 127.0.0.1, from ``local_address`` (another loopback address,
        such as 127.0.0.2, to look like another host) when given."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
        client = cls(tcp, tcp, ca_file, domain)
        if direct_tls:
            try:
                await client._tls()
            except BaseException:
                await tcp.aclose()
                raise
        return client

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    async def _tls(self) -> None:
        ssl_stream = trio.SSLStream(self.tcp, self._context(), server_hostname=self.domain)
        with trio.fail_after(10):
            await ssl_stream.do_handshake()
        self.stream = ssl_stream
        self.parser = xml.StreamParser()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next(self, within_s: float = 10) -> ET.Element | xml.StreamOpened | None:
        """The next stream header or element; None once the server closed the stream."""
        with trio.fail_after(within_s):
            while True:
                event = self.parser.next_event()
                if isinstance(event, xml.StanzaReceived):
                    return event.element
                if isinstance(event, xml.StreamOpened):
                    return event
                if isinstance(event, xml.StreamClosed | xml.ConnectionClosed):
                    self.closed = True
                    return None
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.parser.receive_data(bytes(data))

    async def element(self, within_s: float = 10) -> ET.Element:
        while True:
            got = await self.next(within_s)
            if got is None:
                raise EOFError("the server closed the stream")
            if isinstance(got, ET.Element):
                return got

    async def stream_error(self, within_s: float = 10) -> str:
        """Read until a stream error arrives; its condition."""
        while True:
            got = await self.element(within_s)
            if got.tag == f"{{{STREAMS}}}error":
                return got[0].tag.split("}")[1]

    async def login(
        self,
        user: str,
        password: str,
        *,
        resource: str = "test",
        starttls: bool = True,
        bind: bool = True,
    ) -> str:
        """STARTTLS (unless already TLS), SASL PLAIN, bind; returns the bound full JID (or
        "" with ``bind=False``: the stream then waits for a bind or an XEP-0198 resume)."""
        await self.send(header(self.domain))
        features = await self.element()
        if starttls:
            assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is not None
            await self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            proceed = await self.element()
            assert proceed.tag == "{urn:ietf:params:xml:ns:xmpp-tls}proceed"
            await self._tls()
            await self.send(header(self.domain))
            features = await self.element()
        assert features.find(f"{{{SASL}}}mechanisms") is not None
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self.send(f"<auth xmlns='{SASL}' mechanism='PLAIN'>{token}</auth>".encode())
        result = await self.element()
        if result.tag != f"{{{SASL}}}success":
            raise PermissionError(result[0].tag.split("}")[1] if len(result) else "failure")
        self.parser = xml.StreamParser()
        await self.send(header(self.domain))
        self.features = await self.element()  # bind, and what else is offered once bound
        if not bind:
            return ""
        await self.send(
            b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
            + f"<resource>{resource}</resource></bind></iq>".encode()
        )
        bound = await self.element()
        jid = bound.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid")
        assert jid, ET.tostring(bound)
        return jid

    async def aclose(self) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            # (the test may have dropped the connection itself)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()
