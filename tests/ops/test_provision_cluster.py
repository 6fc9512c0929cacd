"""init_cluster (``villaged init --dev --cluster``) and the documented cluster examples."""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import signal
import stat
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import trio
from cryptography import x509

from villaged.cluster.pki import NODE_URI_PREFIX
from villaged.config import Endpoint, check_config_files, load_config
from villaged.config.model import ClusterConfig
from villaged.ops.devcluster import DevClusterError, run_local
from villaged.ops.provision import init_cluster, read_demo_accounts

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
CONF = Path(__file__).resolve().parents[2] / "conf" / "cluster"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def node_uri(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def snapshot(directory: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_three_nodes_load_and_check(tmp_path: Path) -> None:
    result = init_cluster(tmp_path / "c", demo_users=True, now=NOW)
    assert [node.id for node in result.nodes] == ["n1", "n2", "n3"]
    assert result.kept == ()
    assert mode(tmp_path / "c") == 0o700
    assert mode(tmp_path / "c/ca/ca.key") == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "c/ca/ca.crt").read_bytes())
    keysets = set()
    ports: list[int] = []
    for k, node in enumerate(result.nodes, start=1):
        config = load_config(node.config)
        check_config_files(config)
        assert config.server.node == f"n{k}"
        assert config.cluster.enabled
        assert config.cluster.id == result.cluster_id
        assert config.cluster.replicas == 3
        assert config.listeners.cluster.bind == (Endpoint("127.0.0.1", 5222 + 10 * (k - 1) + 6),)
        assert [(n.id, n.address, n.zone) for n in config.cluster.nodes] == [
            ("n1", Endpoint("127.0.0.1", 5228), "a"),
            ("n2", Endpoint("127.0.0.1", 5238), "b"),
            ("n3", Endpoint("127.0.0.1", 5248), "c"),
        ]
        assert config.storage.dir == node.directory.absolute() / "data"
        assert config.admin.socket == node.directory.absolute() / "admin.sock"
        assert config.cluster.ca_file == node.directory.absolute() / "cluster/ca.crt"
        assert mode(config.cluster.key_file) == 0o600
        assert mode(config.storage.keyset) == 0o600
        assert config.cluster.ca_file.read_bytes() == (tmp_path / "c/ca/ca.crt").read_bytes()
        cert = x509.load_pem_x509_certificate(config.cluster.cert_file.read_bytes())
        cert.verify_directly_issued_by(ca)
        assert node_uri(config.cluster.cert_file) == [f"{NODE_URI_PREFIX}n{k}"]
        keysets.add(config.storage.keyset.read_bytes())
        ports += [e.port for listener in config.listeners.by_name().values() for e in listener.bind]
    assert len(keysets) == 1  # every replica unwraps the same data keys
    assert len(ports) == len(set(ports)) == 21
    accounts = tmp_path / "c/demo-accounts.txt"
    assert mode(accounts) == 0o600
    assert [jid for jid, _ in read_demo_accounts(accounts)] == ["alice@localhost", "bob@localhost"]
    assert not (tmp_path / "c/n1/data").exists()  # accounts are made by the running cluster


def test_rerun_keeps_everything_and_force_renews(tmp_path: Path) -> None:
    first = init_cluster(tmp_path / "c", nodes=2, zones=["x"], demo_users=True, now=NOW)
    before = snapshot(tmp_path / "c")
    again = init_cluster(tmp_path / "c", nodes=2, zones=["x"], demo_users=True, now=NOW)
    assert again.created == ()
    assert sorted(again.kept) == sorted(first.created)
    assert again.cluster_id == first.cluster_id
    assert snapshot(tmp_path / "c") == before
    forced = init_cluster(tmp_path / "c", nodes=2, zones=["x"], force=True, now=NOW)
    assert forced.kept == ()
    assert forced.cluster_id != first.cluster_id
    after = snapshot(tmp_path / "c")
    assert after[tmp_path / "c/n1/keys/keyset.json"] != before[tmp_path / "c/n1/keys/keyset.json"]
    assert after[tmp_path / "c/n1/keys/keyset.json"] == after[tmp_path / "c/n2/keys/keyset.json"]


def test_a_lost_node_is_remade_with_the_same_keyset_and_ca(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", now=NOW)
    keyset = (tmp_path / "c/n1/keys/keyset.json").read_bytes()
    for path in sorted((tmp_path / "c/n2").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    result = init_cluster(tmp_path / "c", now=NOW)
    assert all(path.is_relative_to(tmp_path / "c/n2") for path in result.created)
    assert (tmp_path / "c/n2/keys/keyset.json").read_bytes() == keyset
    config = load_config(tmp_path / "c/n2/villaged.toml")
    check_config_files(config)
    ca = x509.load_pem_x509_certificate((tmp_path / "c/ca/ca.crt").read_bytes())
    x509.load_pem_x509_certificate(config.cluster.cert_file.read_bytes()).verify_directly_issued_by(
        ca
    )


def test_a_new_ca_reissues_the_node_certificates(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", nodes=1, now=NOW)
    (tmp_path / "c/ca/ca.key").unlink()
    result = init_cluster(tmp_path / "c", nodes=1, now=NOW)
    assert tmp_path / "c/n1/cluster/node.crt" in result.created
    ca = x509.load_pem_x509_certificate((tmp_path / "c/ca/ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "c/n1/cluster/node.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert load_config(tmp_path / "c/n1/villaged.toml").cluster.replicas == 1


def test_differing_keysets_are_refused(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", nodes=2, now=NOW)
    (tmp_path / "c/n2/keys/keyset.json").unlink()
    init_cluster(tmp_path / "c", nodes=1, force=True, now=NOW)  # n1 gets a new keyset
    (tmp_path / "c/n2/keys/keyset.json").write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"the nodes' keysets differ \(n1, n2\)") as caught:
        init_cluster(tmp_path / "c", nodes=2, now=NOW)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "a dev cluster has 1 to 7 nodes, not 0"),
        ({"nodes": 8}, "a dev cluster has 1 to 7 nodes, not 8"),
        ({"zones": []}, "at least one zone is needed"),
        ({"zones": ["a", "B"]}, "zone 'B' is not a zone name"),
        ({"zones": [""]}, "zone '' is not a zone name"),
        ({"port_base": 65510}, "port base 65510 does not leave room for 27 ports"),
        ({"domain": "Bad Domain"}, "is not usable"),
    ],
)
def test_bad_arguments_write_nothing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        init_cluster(tmp_path / "c", now=NOW, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


def test_zones_are_given_round_robin(tmp_path: Path) -> None:
    result = init_cluster(tmp_path / "c", nodes=5, zones=["east", "west"], now=NOW)
    assert [node.zone for node in result.nodes] == ["east", "west", "east", "west", "east"]
    config = load_config(result.nodes[4].config)
    assert [n.zone for n in config.cluster.nodes] == ["east", "west", "east", "west", "east"]
    assert config.listeners.c2s.bind == (Endpoint("127.0.0.1", 5262),)
    assert config.cluster.replicas == 3  # three voters per shard; the others are learners


# --- conf/cluster ------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["a", "b", "c"])
def test_documented_cluster_examples_load(zone: str) -> None:
    config = load_config(CONF / f"node-{zone}.toml")
    assert config.server.node == f"node-{zone}"
    assert config.cluster.enabled
    assert [(n.id, n.zone) for n in config.cluster.nodes] == [
        ("node-a", "a"),
        ("node-b", "b"),
        ("node-c", "c"),
    ]
    me = config.cluster.member(config.server.node)
    assert me is not None
    assert me.zone == zone
    assert config.listeners.cluster.bind == (me.address,)
    assert config.storage.keyset == Path("/etc/villaged/keyset.json")
    assert config.cluster.key_file == Path("/etc/villaged/cluster/node.key")


def test_documented_examples_mention_every_cluster_key() -> None:
    for name in ("node-a.toml", "node-b.toml", "node-c.toml"):
        text = (CONF / name).read_text()
        for field in fields(ClusterConfig):
            key = "[[cluster.nodes]]" if field.name == "nodes" else f"\n{field.name} = "
            assert key in text, (name, field.name)


def test_documented_examples_differ_only_where_they_should() -> None:
    def general(text: str) -> list[str]:
        own = ("# node-", "node = ", "bind = ")  # the first line, [server] node, the binds
        return [line for line in text.splitlines() if not line.startswith(own)]

    texts = {(CONF / f"node-{z}.toml").read_text() for z in "abc"}
    lists = {text[text.index('[[cluster.nodes]]\nid = "node-a"') :] for text in texts}
    assert len(lists) == 1  # the same members on every node
    assert len({tuple(general(text)) for text in texts}) == 1


# --- villaged cluster run-local, with stand-in nodes -----------------------------------------

FAKE_NODE = """
import sys, trio
from villaged.config import load_config
from villaged.ops.control import control_socket_path, serve_control

config = load_config(__import__("pathlib").Path(sys.argv[1]))
path = control_socket_path(config)
path.parent.mkdir(mode=0o700, exist_ok=True)
users = set()

async def status(args):
    return {"groups": [{"group": "meta", "leader": "n1"}]}

async def user_list(args):
    return sorted(users)

async def user_add(args):
    users.add(args["jid"])
    print("added", args["jid"], args["password"], flush=True)
    return args["jid"]

handlers = {"cluster.status": status, "user.list": user_list, "user.add": user_add}
trio.run(serve_control, path, handlers)
"""


def fake_node(config: Path) -> list[str]:
    return [sys.executable, "-c", FAKE_NODE, str(config)]


def test_run_local_starts_creates_accounts_and_stops(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    init_cluster(directory, nodes=2, demo_users=True, now=NOW)
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if line == "Ctrl-C stops the cluster.":
            os.kill(os.getpid(), signal.SIGTERM)

    trio.run(functools.partial(run_local, directory, out=out, command=fake_node))
    assert "created demo account alice@localhost" in lines
    assert "created demo account bob@localhost" in lines
    assert "  n2 (zone b): c2s 127.0.0.1:5232" in lines
    assert lines[-2:] == ["SIGTERM: stopping the nodes", "stopped n1, n2"]
    passwords = dict(read_demo_accounts(directory / "demo-accounts.txt"))
    log = (directory / "n1/villaged.log").read_text()
    assert f"added alice@localhost {passwords['alice@localhost']}" in log
    assert not (directory / "n2/villaged.log").read_text()  # accounts go through n1 only


def test_run_local_reports_a_node_that_exits(tmp_path: Path) -> None:
    init_cluster(tmp_path / "c", nodes=2, now=NOW)

    def dies(config: Path) -> list[str]:
        if config.parent.name == "n2":
            return [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"]
        return fake_node(config)

    with pytest.raises(
        DevClusterError, match=r"^node n2 exited with code 3; its log .* ends: cannot bind$"
    ):
        trio.run(functools.partial(run_local, tmp_path / "c", out=lambda line: None, command=dies))
