"""[federation] and [[federation.peers]]: defaults, every key, and errors that name the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from villaged.config import ConfigError, FederationConfig, PeerConfig, load_config

if TYPE_CHECKING:
    from pathlib import Path

MINIMAL = '[server]\ndomain = "example.org"\n[tls]\ncert = "c.pem"\nkey = "k.pem"\n'


def load(tmp_path: Path, text: str) -> FederationConfig:
    path = tmp_path / "x.toml"
    path.write_text(MINIMAL + text)
    return load_config(path).federation


def test_off_by_default(tmp_path: Path) -> None:
    federation = load(tmp_path, "")
    assert federation == FederationConfig()
    assert not federation.enabled
    assert federation.permits("anyone.example")


def test_peers_and_policy(tmp_path: Path) -> None:
    federation = load(
        tmp_path,
        '[federation]\nenabled = true\nallow = ["a.test", "b.test"]\ndeny = ["c.test"]\n'
        '[[federation.peers]]\ndomain = "a.test"\nhost = "::1"\nport = 5270\ndirect_tls = true\n'
        '[[federation.peers]]\ndomain = "b.test"\nhost = "peer.internal"\nrequire_tls = false\n',
    )
    assert federation.peers == (
        PeerConfig("a.test", "::1", 5270, direct_tls=True),
        PeerConfig("b.test", "peer.internal", 5269, require_tls=False),
    )
    assert federation.permits("a.test")
    assert not federation.permits("c.test")
    assert not federation.permits("d.test")  # not in allow


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[federation.peers]]\ndomain = "a.test"\nhost = "x y"\n', "federation.peers[0].host"),
        ('[[federation.peers]]\ndomain = "A.test"\nhost = "h"\n', "federation.peers[0].domain"),
        ('[[federation.peers]]\nhost = "h"\n', "federation.peers[0].domain"),
        (
            '[[federation.peers]]\ndomain = "a.test"\nhost = "h"\n'
            '[[federation.peers]]\ndomain = "a.test"\nhost = "h2"\n',
            'federation.peers[1].domain: "a.test" is listed twice',
        ),
        ('[federation]\ndeny = ["a.test"]\nallow = ["a.test"]\n', 'federation.deny: "a.test"'),
        ("[federation]\nretry_initial = 60\nretry_max = 10\n", "federation.retry_max"),
        ("[federation]\nqueue_deadline = 1\n", "federation.queue_deadline"),
        ("[federation]\nburst_bytes = 20000\n", "federation.burst_bytes"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert expected in str(caught.value)
