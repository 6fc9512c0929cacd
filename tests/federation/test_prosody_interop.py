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
from tests.federation.interop import Inbox, inbound_methods, subscribe_see_and_chat
from tests.federation.nodes import Route, start_federated_node, write_federated_config
from tests.federation.pki import PemPair, issue, make_ca, write_pem_pair
from tests.federation.processes import LOOPBACK
from tests.federation.prosody import AuthMode, ProsodyServer, prosody_available
from tests.federation.test_villaged_federation import client
from tests.ports import free_port_base

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


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

        await subscribe_see_and_chat(
            vera, inbox, VERA, pat, PAT, villaged_starts=initiator == "villaged"
        )

        # Each side authenticated the other the way the mode says.
        prosody_log = prosody.log_text()
        methods = inbound_methods(caplog)
        if auth_mode == "certs":
            assert SASL_EXTERNAL_ACCEPTED in prosody_log
            assert methods == {"sasl-external"}
        else:
            assert DIALBACK_VERIFY_ASKED.search(prosody_log)
            assert methods == {"dialback"}
        await vera.aclose()
    nursery.cancel_scope.cancel()
