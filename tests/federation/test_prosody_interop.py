"""villaged federating with a real Prosody (Debian's) on loopback: a villaged user and a Prosody
user complete a subscription handshake, see each other's presence and chat both ways —
started from either side, once with certificates (SASL EXTERNAL) and once with dialback."""

from __future__ import annotations

import logging
import re
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Literal

import pytest
import trio

from tests.e2e.xmpp_client import TrioXmppClient, open_xmpp_client
from tests.federation.nodes import Route, start_federated_node, write_federated_config
from tests.federation.pki import PemPair, issue, make_ca, write_pem_pair
from tests.federation.prosody import LOOPBACK, AuthMode, ProsodyServer, prosody_available
from tests.federation.test_villaged_federation import client
from tests.ports import free_port_base

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from tests.net.rawclient import RawClient

pytestmark = pytest.mark.skipif(
    not prosody_available(),
    reason="prosody is not installed (Debian's `prosody`, which `bash .ci/system-deps` installs)",
)

STEP_S = 20.0
VERA, PAT = "vera@v.test", "pat@prosody.test"
SASL_EXTERNAL_ACCEPTED = "Accepting SASL EXTERNAL identity from v.test"
DIALBACK_VERIFY_ASKED = re.compile(r"asking v\.test if key \S+ belongs to them")


@asynccontextmanager
async def prosody_user(server: ProsodyServer, ca_file: Path) -> AsyncIterator[TrioXmppClient]:
    async with open_xmpp_client(PAT) as pat:
        with trio.fail_after(STEP_S):
            await pat.connect(
                LOOPBACK,
                server.c2s_port,
                direct_tls=False,
                ca_file=ca_file,
                jid=server.jid("pat"),
                password=server.users["pat"],
            )
        yield pat


class Inbox:
    """What vera's stream delivered, kept until a test step asks for it (presence may arrive
    before the step that looks for it)."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.seen: list[ET.Element] = []

    async def wait(self, predicate: Callable[[ET.Element], bool]) -> ET.Element:
        with trio.fail_after(STEP_S):
            while True:
                for element in self.seen:
                    if predicate(element):
                        self.seen.remove(element)
                        return element
                self.seen.append(await self.raw.element(STEP_S))

    async def presence(self, sender: str, ptype: str | None = None) -> ET.Element:
        """A presence from ``sender`` (bare) of ``ptype`` (None: available)."""

        def wanted(element: ET.Element) -> bool:
            return (
                element.tag == "{jabber:client}presence"
                and element.get("from", "").split("/")[0] == sender
                and element.get("type") == ptype
            )

        return await self.wait(wanted)

    async def tagged(self, tag: str) -> ET.Element:
        return await self.wait(lambda element: element.tag == f"{{jabber:client}}{tag}")


@pytest.mark.parametrize("auth_mode", ["certs", "dialback"])
@pytest.mark.parametrize("initiator", ["villaged", "prosody"])
async def test_subscription_presence_and_chat_with_prosody(
    tmp_path: Path,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    auth_mode: AuthMode,
    initiator: Literal["villaged", "prosody"],
) -> None:
    caplog.set_level(logging.INFO, "villaged.federation")
    ca = make_ca("federation test CA")
    certificates: dict[str, PemPair | None] = {"v.test": None, "prosody.test": None}
    client_ca = ca
    if auth_mode == "dialback":
        # Certificates neither server can verify: EXTERNAL is impossible, dialback must carry it.
        untrusted = make_ca("trusted by the clients only")
        certificates = {domain: issue(untrusted, domain) for domain in certificates}
        client_ca = untrusted
    client_ca_file, _ = write_pem_pair(tmp_path / "clients", "ca", client_ca)
    prosody = ProsodyServer(
        tmp_path / "prosody",
        "prosody.test",
        ca,
        auth_mode=auth_mode,
        certificate=certificates["prosody.test"],
        users={"pat": "pat-password"},
    )
    base = free_port_base()
    config = write_federated_config(
        tmp_path / "villaged",
        "v.test",
        ca,
        certificate=certificates["v.test"],
        routes={"prosody.test": Route(prosody.s2s_port)},
        federation_toml="" if auth_mode == "dialback" else "dialback = false\n",
        port_base=base,
    )
    prosody.route("v.test", base + 4)
    async with AsyncExitStack() as stack:
        with trio.fail_after(STEP_S):
            await stack.enter_async_context(prosody.running())
        node = await start_federated_node(nursery, config, users=("vera",))
        vera = await client(node, "vera", available=False, ca_file=client_ca_file)
        inbox = Inbox(vera)
        pat = await stack.enter_async_context(prosody_user(prosody, client_ca_file))
        with trio.fail_after(STEP_S):
            await pat.send_presence()
        await vera.send(b"<presence/>")

        # The subscription handshake, both directions, started by ``initiator``'s user.
        if initiator == "villaged":
            await vera.send(f"<presence to='{PAT}' type='subscribe'/>".encode())
            with trio.fail_after(STEP_S):
                await pat.wait_presence(lambda p: p.type == "subscribe" and p.from_ == VERA)
                await pat.send_presence(to=VERA, type_="subscribed")
                await pat.send_presence(to=VERA, type_="subscribe")
            await inbox.presence(PAT, "subscribe")
            await vera.send(f"<presence to='{PAT}' type='subscribed'/>".encode())
        else:
            with trio.fail_after(STEP_S):
                await pat.send_presence(to=VERA, type_="subscribe")
            await inbox.presence(PAT, "subscribe")
            await vera.send(f"<presence to='{PAT}' type='subscribed'/>".encode())
            await vera.send(f"<presence to='{PAT}' type='subscribe'/>".encode())
            with trio.fail_after(STEP_S):
                await pat.wait_presence(lambda p: p.type == "subscribe" and p.from_ == VERA)
                await pat.send_presence(to=VERA, type_="subscribed")

        # Each sees the other available once both subscriptions stand.
        with trio.fail_after(STEP_S):
            await pat.wait_presence(lambda p: p.type == "available" and p.from_.startswith(VERA))
        await inbox.presence(PAT)

        # Chat both ways.
        await vera.send(f"<message to='{PAT}' type='chat'><body>hi pat</body></message>".encode())
        with trio.fail_after(STEP_S):
            message = await pat.wait_message(lambda m: m.body == "hi pat")
            assert message.from_ == f"{VERA}/r"
            await pat.send_message(f"{VERA}/r", "hi vera")
        got = await inbox.tagged("message")
        assert got.findtext("{jabber:client}body") == "hi vera"
        assert got.get("from", "").startswith(f"{PAT}/")

        # The roster on villaged's side says "both".
        await vera.send(b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
        roster = await inbox.wait(lambda e: e.get("id") == "r1")
        items = {i.get("jid"): i.get("subscription") for i in roster.iter("{jabber:iq:roster}item")}
        assert items == {PAT: "both"}

        # Each side authenticated the other the way the mode says.
        prosody_log = prosody.log_text()
        methods = {
            r.__dict__["method"]
            for r in caplog.records
            if r.__dict__.get("event") == "s2s.inbound_authenticated"
        }
        if auth_mode == "certs":
            assert SASL_EXTERNAL_ACCEPTED in prosody_log
            assert methods == {"sasl-external"}
        else:
            assert DIALBACK_VERIFY_ASKED.search(prosody_log)
            assert methods == {"dialback"}
        await vera.aclose()
    nursery.cancel_scope.cancel()
