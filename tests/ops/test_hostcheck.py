"""The host audit (``villaged check``) on a dev node: what it passes, what it flags, exit codes."""

from __future__ import annotations

import datetime as dt
import grp
import os
import pwd
from dataclasses import replace
from typing import TYPE_CHECKING

import pytest

from villaged.cli import main
from villaged.config import Config, Endpoint, load_config
from villaged.ops.hostcheck import Finding, audit_host
from villaged.ops.provision import init_dev
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file

if TYPE_CHECKING:
    from pathlib import Path

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    result = init_dev(tmp_path / "n", domain="example.org", port_base=15222, now=NOW)
    return load_config(result.config)


def problems(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.severity != "ok"]


def only_problem(findings: list[Finding]) -> Finding:
    found = problems(findings)
    assert len(found) == 1, found
    return found[0]


def test_a_fresh_dev_node_passes(config: Config) -> None:
    findings = audit_host(config, now=NOW)
    assert problems(findings) == []
    subjects = {finding.subject for finding in findings}
    assert {str(config.storage.keyset), str(config.tls.key), "listeners.http.bind"} <= subjects


def test_a_started_node_with_private_directories_passes(config: Config) -> None:
    for name in ("", "log", "vault", "admin", "audit"):
        (config.storage.dir / name).mkdir(mode=0o700, exist_ok=True)
        os.chmod(config.storage.dir / name, 0o700)
    write_private_file(config.storage.dir / "audit" / "audit-signing.key", b"key")
    write_private_file(config.storage.dir / "admin" / "operators.json", b"{}")
    assert problems(audit_host(config, now=NOW)) == []


@pytest.mark.parametrize("which", ["keyset", "tls key", "operators", "audit key", "backup key"])
def test_a_group_readable_private_file_is_an_error(config: Config, which: str) -> None:
    path = {
        "keyset": config.storage.keyset,
        "tls key": config.tls.key,
        "operators": config.storage.dir / "admin" / "operators.json",
        "audit key": config.storage.dir / "audit" / "audit-signing.key",
        "backup key": config.storage.keyset.parent / "backup-signing.key",
    }[which]
    for directory in (config.storage.dir, path.parent):
        directory.mkdir(mode=0o700, exist_ok=True)
    if not path.exists():
        write_private_file(path, b"secret")
    os.chmod(path, 0o640)
    found = [f for f in problems(audit_host(config, now=NOW)) if f.subject != str(path.parent)]
    assert [(f.severity, f.subject) for f in found] == [("error", str(path))]
    assert "0640" in found[0].message


def test_a_private_file_of_another_user_is_an_error(config: Config) -> None:
    other = os.geteuid() + 1
    found = problems(audit_host(config, now=NOW, uid=other))
    assert {f.subject for f in found} == {str(config.tls.key), str(config.storage.keyset)}
    assert all(f.severity == "error" and f"not {other}" in f.message for f in found)


def test_a_missing_keyset_is_an_error(config: Config) -> None:
    config.storage.keyset.unlink()
    finding = only_problem(audit_host(config, now=NOW))
    assert (finding.severity, finding.subject) == ("error", str(config.storage.keyset))
    assert "does not exist" in finding.message


def test_a_certificate_near_and_past_its_end(config: Config) -> None:
    soon = only_problem(audit_host(config, now=NOW + dt.timedelta(days=350)))
    assert (soon.severity, soon.subject) == ("warning", str(config.tls.cert))
    assert "expires on 2027-11-29" in soon.message
    assert "in 15 days" in soon.message
    late = only_problem(audit_host(config, now=NOW + dt.timedelta(days=366)))
    assert (late.severity, late.subject) == ("error", str(config.tls.cert))
    assert "expired on 2027-11-29" in late.message
    early = only_problem(audit_host(config, now=NOW - dt.timedelta(days=1)))
    assert "not valid before" in early.message


def test_a_certificate_made_in_the_past_has_expired(config: Config) -> None:
    cert, key = make_self_signed("example.org", NOW - dt.timedelta(days=400))
    write_private_file(config.tls.key, key)
    write_file_atomic(config.tls.cert, cert, 0o644)
    finding = only_problem(audit_host(config, now=NOW))
    assert (finding.severity, finding.subject) == ("error", str(config.tls.cert))
    assert "expired" in finding.message


def test_the_certificate_must_name_the_domain(config: Config) -> None:
    cert, key = make_self_signed("other.org", NOW)
    write_private_file(config.tls.key, key)
    write_file_atomic(config.tls.cert, cert, 0o644)
    finding = only_problem(audit_host(config, now=NOW))
    assert finding.severity == "error"
    assert "does not name example.org" in finding.message
    assert "other.org" in finding.message


@pytest.mark.parametrize(
    ("domain", "named"),
    [("chat.example.org", True), ("a.chat.example.org", False), ("example.net", False)],
)
def test_a_wildcard_names_one_label(config: Config, domain: str, named: bool) -> None:
    moved = replace(config, server=replace(config.server, domain=domain))
    assert (problems(audit_host(moved, now=NOW)) == []) is named


def test_a_key_of_another_certificate_is_an_error(config: Config) -> None:
    _, key = make_self_signed("example.org", NOW)
    write_private_file(config.tls.key, key)
    finding = only_problem(audit_host(config, now=NOW))
    assert (finding.severity, finding.subject) == ("error", "tls.key")
    assert "is not the key of the certificate" in finding.message


def test_the_old_profile_is_a_warning(config: Config) -> None:
    old = replace(config, tls=replace(config.tls, profile="old"))
    finding = only_problem(audit_host(old, now=NOW))
    assert (finding.severity, finding.subject) == ("warning", "tls.profile")
    listeners = config.listeners
    c2s = replace(listeners.c2s, tls_profile="old")
    one = replace(config, listeners=replace(listeners, c2s=c2s))
    finding = only_problem(audit_host(one, now=NOW))
    assert (finding.severity, finding.subject) == ("warning", "listeners.c2s.tls_profile")


def test_metrics_off_loopback_need_allow_public(config: Config) -> None:
    # load_config refuses this, so build the config the way a bug or an edit would.
    http = replace(config.listeners.http, bind=(Endpoint("0.0.0.0", 15225),))  # noqa: S104
    public = replace(config, listeners=replace(config.listeners, http=http))
    finding = only_problem(audit_host(public, now=NOW))
    assert (finding.severity, finding.subject) == ("error", "listeners.http.bind")
    assert "0.0.0.0:15225" in finding.message
    allowed = replace(http, allow_public=True)
    public = replace(config, listeners=replace(config.listeners, http=allowed))
    assert only_problem(audit_host(public, now=NOW)).severity == "warning"


def test_listeners_report_where_they_bind(config: Config) -> None:
    c2s = replace(config.listeners.c2s, bind=(Endpoint("::", 15222),))
    listeners = replace(
        config.listeners, c2s=c2s, cluster=replace(config.listeners.cluster, bind=())
    )
    by_subject = {
        f.subject: f.message for f in audit_host(replace(config, listeners=listeners), now=NOW)
    }
    assert by_subject["listeners.c2s.bind"] == "[::]:15222 (reachable from the network)"
    assert by_subject["listeners.cluster.bind"] == "disabled"


def test_data_directories_must_be_private(config: Config) -> None:
    config.storage.dir.mkdir(mode=0o700)
    (config.storage.dir / "vault").mkdir(mode=0o700)
    os.chmod(config.storage.dir / "vault", 0o750)  # noqa: S103
    finding = only_problem(audit_host(config, now=NOW))
    assert (finding.severity, finding.subject) == ("error", str(config.storage.dir / "vault"))
    assert "0750" in finding.message
    os.chmod(config.storage.dir / "vault", 0o700)
    owners = [f for f in audit_host(config, now=NOW, uid=os.geteuid() + 1) if "owned" in f.message]
    assert str(config.storage.dir) in {f.subject for f in owners}


def test_a_world_writable_config_is_an_error(config: Config) -> None:
    os.chmod(config.source, 0o666)  # noqa: S103
    finding = only_problem(audit_host(config, now=NOW))
    assert (finding.severity, finding.subject) == ("error", str(config.source))


def test_the_admin_group_and_socket_directory(config: Config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chmod(run, 0o700)
    own_group = grp.getgrgid(os.getegid()).gr_name
    admin = replace(config.admin, socket=run / "admin.sock", group=own_group)
    finding = only_problem(audit_host(replace(config, admin=admin), now=NOW))
    assert (finding.severity, finding.subject) == ("warning", str(run))
    os.chmod(run, 0o711)  # noqa: S103
    assert problems(audit_host(replace(config, admin=admin), now=NOW)) == []
    os.chmod(run, 0o777)  # noqa: S103
    finding = only_problem(audit_host(replace(config, admin=admin), now=NOW))
    assert (finding.severity, finding.subject) == ("error", str(run))
    missing = replace(admin, group="no-such-group-villaged", socket=tmp_path / "gone" / "a.sock")
    found = problems(audit_host(replace(config, admin=missing), now=NOW))
    assert [(f.severity, f.subject) for f in found] == [
        ("error", "admin.group"),
        ("warning", str(tmp_path / "gone")),
    ]


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(0o755, None), (0o644, "not executable"), (0o777, "anyone may rewrite"), (None, "No such")],
)
def test_the_alert_command(
    config: Config, tmp_path: Path, mode: int | None, problem: str | None
) -> None:
    program = tmp_path / "alert"
    if mode is not None:
        program.write_text("#!/bin/sh\n")
        os.chmod(program, mode)
    monitor = replace(config.monitor, alert_command=(str(program), "--page"))
    found = problems(audit_host(replace(config, monitor=monitor), now=NOW))
    if problem is None:
        assert found == []
    else:
        assert [(f.severity, f.subject) for f in found] == [("error", "monitor.alert_command")]
        assert problem in found[0].message


def test_now_must_be_aware(config: Config) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        audit_host(config, now=NOW.replace(tzinfo=None))


def test_finding_lines() -> None:
    assert str(Finding("ok", "tls.profile", "modern")) == "ok tls.profile: modern"
    assert str(Finding("error", "/k", "bad")) == "error: /k: bad"


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI audits with the real clock: a node made now, not at NOW.
    result = init_dev(tmp_path / "n", domain="example.org", now=dt.datetime.now(dt.UTC))
    assert main(["check", "-c", str(result.config)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith(f"{result.config}: ok\n")
    assert all(line.startswith("ok ") for line in out.splitlines()[:-1])
    key = tmp_path / "n" / "tls" / "key.pem"
    os.chmod(key, 0o644)
    os.chmod(result.config, 0o666)  # noqa: S103
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "-c", str(result.config)])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"error: {result.config}: mode 0666: anyone may rewrite the config",
        f"error: {key}: TLS key (tls.key) has mode 0644: others can read it; make it 0600",
        "villaged: error: 2 problems",
    ]
    assert f"{result.config}: ok" not in out


def test_cli_checks_owners_against_a_named_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = init_dev(tmp_path / "n", now=dt.datetime.now(dt.UTC))
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert main(["check", "-c", str(result.config), "--user", me]) == 0
    other = next((u.pw_name for u in pwd.getpwall() if u.pw_uid not in (os.geteuid(), 0)), None)
    capsys.readouterr()
    if other is not None:  # the files belong to whoever made them, not to that user
        with pytest.raises(SystemExit):
            main(["check", "-c", str(result.config), "--user", other])
        assert f"is owned by uid {os.geteuid()}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "-c", str(result.config), "--user", "no-such-user-here"])
    assert "no such user" in capsys.readouterr().err


def test_federation_trust_store_listeners_and_peers(config: Config, tmp_path: Path) -> None:
    from villaged.config import PeerConfig

    def check(
        ca_file: Path | None = None, peers: tuple[PeerConfig, ...] = ()
    ) -> list[tuple[str, str]]:
        federation = replace(config.federation, enabled=True, ca_file=ca_file, peers=peers)
        found = problems(audit_host(replace(config, federation=federation), now=NOW))
        return [(f.severity, f.subject) for f in found]

    assert check() == []  # the dev node binds s2s; the system trust store
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(config.tls.cert.read_bytes())
    assert check(ca_file=bundle) == []
    bundle.write_text("not a certificate")
    assert check(ca_file=bundle) == [("error", "federation.ca_file")]
    assert check(ca_file=tmp_path / "absent.pem") == [("error", "federation.ca_file")]
    open_peer = PeerConfig("test.example", "127.0.0.1", require_tls=False)
    assert check(peers=(open_peer,)) == [("warning", "federation.peers[test.example]")]
    listeners = replace(
        config.listeners,
        s2s=replace(config.listeners.s2s, bind=()),
        s2s_tls=replace(config.listeners.s2s_tls, bind=()),
    )
    federation = replace(config.federation, enabled=True)
    found = problems(
        audit_host(replace(config, federation=federation, listeners=listeners), now=NOW)
    )
    assert [(f.severity, f.subject) for f in found] == [("warning", "listeners.s2s")]
