import pytest

from villaged.xmpp.jid import JID, JIDError


def test_parse_full_jid_is_canonical() -> None:
    jid = JID.parse("Alice@Example.ORG./Phone")
    assert (jid.local, jid.domain, jid.resource) == ("alice", "example.org", "Phone")
    assert str(jid) == "alice@example.org/Phone"
    assert str(jid.bare) == "alice@example.org"
    assert jid.bare.is_bare
    assert not jid.is_bare
    bare = jid.bare
    assert bare.bare is bare


def test_domain_only_and_with_resource() -> None:
    jid = JID.parse("example.org")
    assert str(jid) == "example.org"
    assert str(jid.with_resource("r1")) == "example.org/r1"


def test_ipv6_literal_domain() -> None:
    assert JID.parse("a@[0:0::1]").domain == "[::1]"


def test_unicode_local_and_domain() -> None:
    jid = JID.parse("Ünïcode@Bücher.example")
    assert jid.local == "ünïcode"
    assert jid.domain == "bücher.example"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("@example.org", "empty localpart"),
        ("a@example.org/", "empty resourcepart"),
        ("a b@example.org", "localpart"),
        ("a:b@example.org", "forbidden character"),
        ("a@", "empty domainpart"),
        ("a@exa mple.org", "not allowed"),
        ("a@-bad.org", "starts or ends"),
        ("a@x..org", "empty label"),
        ("a@" + "x" * 64 + ".org", "longer than 63"),
        ("a@[zz]", "IPv6"),
        ("x" * 1024 + "@example.org", "longer than 1023"),
        ("a@example.org/\u0007", "resourcepart"),
        ("a@\udcff.org", "UTF-8"),
    ],
)
def test_bad_jids_name_the_part(text: str, fragment: str) -> None:
    with pytest.raises(JIDError, match=fragment):
        JID.parse(text)


def test_repeated_parses_agree_and_errors_are_raised_every_time() -> None:
    assert JID.parse("Alice@Example.ORG/phone") is JID.parse("Alice@Example.ORG/phone")
    long_resource = "r" * 200  # past the cache: parsed afresh, same result
    assert JID.parse(f"a@b/{long_resource}") == JID.parse(f"a@b/{long_resource}")
    for _ in range(2):
        with pytest.raises(JIDError, match="localpart"):
            JID.parse("a b@example.org")
