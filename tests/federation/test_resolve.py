"""villaged.federation.resolve: static peers, RFC 2782 ordering, XEP-0368 merging, fallbacks and
bounds through a fake `Lookup`; and `DnsLookup` against a small DNS server on 127.0.0.1 (no
query ever leaves loopback)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from villaged.federation import resolve as resolve_module
from villaged.federation.resolve import (
    DEFAULT_PORT,
    MAX_CANDIDATES,
    Candidate,
    DnsLookup,
    LookupFailedError,
    ResolutionError,
    SrvRecord,
    StaticPeer,
    merge_srv,
    order_srv,
    resolve,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

DOMAIN = "example.test"
XMPPS = f"_xmpps-server._tcp.{DOMAIN}"
XMPP = f"_xmpp-server._tcp.{DOMAIN}"

T = TypeVar("T")


@dataclass
class FakeDns:
    """Answers from tables; a name in ``failing`` gets no answer at all (timeout, SERVFAIL)."""

    srv_records: dict[str, list[SrvRecord]] = field(default_factory=dict)
    address_records: dict[str, list[str]] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    queries: list[str] = field(default_factory=list)

    async def srv(self, name: str) -> Sequence[SrvRecord]:
        return self._answer("SRV", name, self.srv_records)

    async def addresses(self, name: str) -> Sequence[str]:
        return self._answer("A/AAAA", name, self.address_records)

    def _answer(self, kind: str, name: str, table: Mapping[str, list[T]]) -> list[T]:
        self.queries.append(f"{kind} {name}")
        if name in self.failing:
            raise LookupFailedError(f"{kind} {name}: timed out")
        return table.get(name, [])


def srv(priority: int, weight: int, port: int, target: str) -> SrvRecord:
    return SrvRecord(priority, weight, port, target)


class ScriptedRandom:
    """``randint`` answers from a script, and records the ranges it was asked for."""

    def __init__(self, *answers: int) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.asked.append((a, b))
        return self.answers.pop(0)


# --- the static peers table ---------------------------------------------------------------------


async def test_static_peer_is_used_for_its_exact_domain_without_dns() -> None:
    fake = FakeDns()
    static: dict[str, StaticPeer] = {
        "villaged.test": Candidate("127.0.0.1", 25269, direct_tls=True),
        "prosody.test": ("127.0.0.1", 25270),
    }
    assert await resolve("villaged.test", static=static, lookup=fake) == [
        Candidate("127.0.0.1", 25269, direct_tls=True)
    ]
    assert await resolve("Prosody.Test.", static=static, lookup=fake) == [
        Candidate("127.0.0.1", 25270, direct_tls=False)
    ]
    assert fake.queries == []

    # Exact domains only: a subdomain goes to DNS.
    fake.address_records["muc.prosody.test"] = ["192.0.2.7"]
    assert await resolve("muc.prosody.test", static=static, lookup=fake) == [
        Candidate("muc.prosody.test", DEFAULT_PORT)
    ]
    assert "SRV _xmpp-server._tcp.muc.prosody.test" in fake.queries


# --- RFC 2782 ordering --------------------------------------------------------------------------


def test_order_srv_sorts_by_priority_whatever_the_weights() -> None:
    records = [srv(30, 100, 1, "c.test"), srv(10, 0, 1, "a.test"), srv(20, 5, 1, "b.test")]
    for seed in range(20):
        ordered = order_srv(records, random.Random(seed))
        assert [r.priority for r in ordered] == [10, 20, 30]


def test_order_srv_follows_rfc2782_selection_exactly() -> None:
    zero = srv(1, 0, 1, "zero.test")
    light = srv(1, 10, 1, "light.test")
    heavy = srv(1, 30, 1, "heavy.test")
    # Running sums over [zero, light, heavy] (weight 0 first): 0, 10, 40. Pick 11 -> heavy;
    # then over [zero, light]: 0, 10; pick 0 -> zero; then light (sum 10, pick 10).
    rng = ScriptedRandom(11, 0, 10)
    assert order_srv([heavy, light, zero], rng) == [heavy, zero, light]
    assert rng.asked == [(0, 40), (0, 10), (0, 10)]


def test_order_srv_weights_are_proportional() -> None:
    heavy, light = srv(1, 90, 1, "heavy.test"), srv(1, 10, 1, "light.test")
    rng = random.Random(2782)
    firsts = Counter(order_srv([light, heavy], rng)[0].target for _ in range(4000))
    assert 0.86 < firsts["heavy.test"] / 4000 < 0.94
    # Weight 0 is possible but rare next to a heavy record (picked only when randint gives 0).
    zero = srv(1, 0, 1, "zero.test")
    firsts = Counter(order_srv([heavy, zero], rng)[0].target for _ in range(4000))
    assert 0 < firsts["zero.test"] < 4000 * 0.03


# --- SRV through resolve ------------------------------------------------------------------------


async def test_direct_tls_and_starttls_records_are_merged_by_priority() -> None:
    fake = FakeDns(
        srv_records={
            XMPPS: [srv(5, 0, 5270, "tls.example.test"), srv(20, 0, 443, "fallback.example.test")],
            XMPP: [srv(10, 0, 5269, "xmpp.example.test")],
        }
    )
    assert await resolve(DOMAIN, lookup=fake, rng=random.Random(1)) == [
        Candidate("tls.example.test", 5270, direct_tls=True),
        Candidate("xmpp.example.test", 5269, direct_tls=False),
        Candidate("fallback.example.test", 443, direct_tls=True),
    ]
    assert f"A/AAAA {DOMAIN}" not in fake.queries  # SRV answered: no address fallback


async def test_same_target_and_port_on_both_services_stay_distinct() -> None:
    fake = FakeDns(
        srv_records={
            XMPPS: [srv(0, 0, 5269, "x.example.test")],
            XMPP: [srv(0, 0, 5269, "x.example.test")],
        }
    )
    candidates = await resolve(DOMAIN, lookup=fake, rng=random.Random(0))
    assert sorted(c.direct_tls for c in candidates) == [False, True]


async def test_duplicate_records_give_one_candidate() -> None:
    record = srv(0, 5, 5269, "xmpp.example.test")
    fake = FakeDns(srv_records={XMPP: [record, record, srv(0, 5, 5269, "XMPP.example.test.")]})
    assert await resolve(DOMAIN, lookup=fake) == [Candidate("xmpp.example.test", 5269)]


async def test_dot_target_means_service_not_available_and_no_address_fallback() -> None:
    fake = FakeDns(srv_records={XMPP: [srv(0, 0, 0, ".")]}, address_records={DOMAIN: ["192.0.2.1"]})
    with pytest.raises(ResolutionError, match="not available") as caught:
        await resolve(DOMAIN, lookup=fake)
    assert caught.value.domain == DOMAIN
    assert not caught.value.temporary
    assert f"A/AAAA {DOMAIN}" not in fake.queries


async def test_dot_on_direct_tls_only_leaves_starttls() -> None:
    fake = FakeDns(
        srv_records={XMPPS: [srv(0, 0, 0, ".")], XMPP: [srv(0, 0, 5269, "xmpp.example.test")]}
    )
    assert await resolve(DOMAIN, lookup=fake) == [Candidate("xmpp.example.test", 5269)]


async def test_no_srv_falls_back_to_the_domain_on_5269() -> None:
    fake = FakeDns(address_records={DOMAIN: ["2001:db8::1", "192.0.2.1"]})
    assert await resolve(DOMAIN, lookup=fake) == [Candidate(DOMAIN, DEFAULT_PORT, direct_tls=False)]
    assert sorted(fake.queries) == sorted([f"SRV {XMPPS}", f"SRV {XMPP}", f"A/AAAA {DOMAIN}"])


async def test_nxdomain_is_a_definite_resolution_error() -> None:
    with pytest.raises(ResolutionError, match="no SRV records and no A/AAAA") as caught:
        await resolve("nowhere.test", lookup=FakeDns())
    assert caught.value.domain == "nowhere.test"
    assert not caught.value.temporary


async def test_dns_failure_is_a_temporary_resolution_error() -> None:
    fake = FakeDns(failing={XMPP}, srv_records={XMPPS: [srv(0, 0, 5270, "tls.example.test")]})
    with pytest.raises(ResolutionError, match="timed out") as caught:
        await resolve(DOMAIN, lookup=fake)
    assert caught.value.temporary

    fake = FakeDns(failing={DOMAIN})
    with pytest.raises(ResolutionError, match=r"A/AAAA example\.test: timed out") as caught:
        await resolve(DOMAIN, lookup=fake)
    assert caught.value.temporary


async def test_candidates_are_bounded_and_keep_the_best_priorities() -> None:
    records = [srv(p, 1, 5269, f"host{p}.example.test") for p in range(100, 0, -1)]
    fake = FakeDns(srv_records={XMPP: records})
    candidates = await resolve(DOMAIN, lookup=fake, rng=random.Random(3))
    assert len(candidates) == MAX_CANDIDATES
    assert [c.host for c in candidates] == [f"host{p}.example.test" for p in range(1, 17)]


@pytest.mark.parametrize(
    "target",
    [
        "192.0.2.1",  # an address, not a name
        "bad_name.example.test",
        "-leading.example.test",
        "localhost",  # a single label
        ("a" * 64) + ".example.test",
        ("abcdefgh." * 32) + "test",  # longer than 253
        "",
    ],
)
async def test_targets_that_are_not_host_names_are_dropped(target: str) -> None:
    good = srv(10, 0, 5269, "good.example.test")
    fake = FakeDns(srv_records={XMPP: [srv(0, 0, 5269, target), good]})
    assert await resolve(DOMAIN, lookup=fake) == [Candidate("good.example.test", 5269)]

    fake = FakeDns(srv_records={XMPP: [srv(0, 0, 5269, target)]})
    with pytest.raises(ResolutionError, match="no SRV record has a usable target"):
        await resolve(DOMAIN, lookup=fake)


def test_bad_ports_are_dropped() -> None:
    with pytest.raises(ResolutionError, match="usable target and port"):
        merge_srv(DOMAIN, [srv(0, 0, 0, "a.example.test")], [], random.Random(0))
    assert merge_srv(DOMAIN, [], [], random.Random(0)) is None


async def test_ip_literal_domains_and_invalid_domains() -> None:
    fake = FakeDns()
    assert await resolve("192.0.2.5", lookup=fake) == [Candidate("192.0.2.5", DEFAULT_PORT)]
    assert await resolve("[2001:db8::5]", lookup=fake) == [Candidate("2001:db8::5", DEFAULT_PORT)]
    with pytest.raises(ResolutionError, match="not a valid host name"):
        await resolve("under_score.test", lookup=fake)
    assert fake.queries == []


async def test_default_lookup_is_built_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDns(address_records={DOMAIN: ["192.0.2.1"]})
    monkeypatch.setattr(resolve_module, "DnsLookup", lambda: fake)
    assert await resolve(DOMAIN) == [Candidate(DOMAIN, DEFAULT_PORT)]
    assert f"A/AAAA {DOMAIN}" in fake.queries


# --- DnsLookup against a DNS server on loopback -------------------------------------------------


ZONE: dict[tuple[str, str], list[str]] = {
    (f"{XMPPS}.", "SRV"): ["5 0 5270 tls.example.test."],
    (f"{XMPP}.", "SRV"): ["10 0 5269 xmpp.example.test."],
    ("_xmpp-server._tcp.nosrv.test.", "SRV"): ["0 0 0 ."],
    ("plain.test.", "A"): ["192.0.2.10"],
    ("plain.test.", "AAAA"): ["2001:db8::10"],
}
SERVFAIL_NAMES = {
    "_xmpp-server._tcp.broken.test.",
    "_xmpps-server._tcp.broken.test.",
    "broken.test.",
}


async def serve_zone(sock: trio.socket.SocketType) -> None:
    """Answer every query from ZONE: NXDOMAIN for unknown names, SERVFAIL for broken.test."""
    known_names = {name for name, _ in ZONE}
    while True:
        data, peer = await sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name = question.name.to_text()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if name in SERVFAIL_NAMES:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in known_names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rdtype) in ZONE:
            response.answer.append(
                dns.rrset.from_text_list(name, 60, "IN", rdtype, ZONE[name, rdtype])
            )
        await sock.sendto(response.to_wire(), peer)


async def test_dns_lookup_queries_a_loopback_server_on_trio() -> None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = sock.getsockname()[1]
        resolver.lifetime = 3.0
        resolver.retry_servfail = False
        lookup = DnsLookup(resolver)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_zone, sock)
            with trio.fail_after(10):
                assert await resolve(DOMAIN, lookup=lookup, rng=random.Random(0)) == [
                    Candidate("tls.example.test", 5270, direct_tls=True),
                    Candidate("xmpp.example.test", 5269, direct_tls=False),
                ]
                assert await resolve("plain.test", lookup=lookup) == [
                    Candidate("plain.test", DEFAULT_PORT)
                ]
                assert sorted(await lookup.addresses("plain.test")) == [
                    "192.0.2.10",
                    "2001:db8::10",
                ]
                assert await lookup.srv("_xmpp-server._tcp.nosrv.test") == [srv(0, 0, 0, ".")]
                with pytest.raises(ResolutionError, match="not available"):
                    await resolve("nosrv.test", lookup=lookup)
                with pytest.raises(ResolutionError, match="no SRV records and no A/AAAA"):
                    await resolve("nowhere.test", lookup=lookup)
                with pytest.raises(ResolutionError) as caught:
                    await resolve("broken.test", lookup=lookup)
                assert caught.value.temporary
                with pytest.raises(LookupFailedError, match=r"(A|AAAA) broken\.test"):
                    await lookup.addresses("broken.test")
            nursery.cancel_scope.cancel()
