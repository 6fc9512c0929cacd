"""sslyze scans a live villaged node's c2s listeners against Mozilla's TLS profiles.

The node is the real thing, built by ``app.run_node`` as ``villaged run`` does (see
tests/nodes.py), on free loopback ports. sslyze runs in its own environment
(``.venv-sslyze/``, made by ``tests/net/sslyze_env.sh``) as a subprocess started with
``trio.run_process``, so the node keeps serving on this trio loop while it is scanned:

* the STARTTLS listener with ``--starttls=xmpp --xmpp_to=localhost`` (RFC 6120 STARTTLS);
* the direct TLS listener (XEP-0368).

The verdict is sslyze's own: its exit status (1 when not compliant) and the compliance line it
prints, which its ``--json_out`` file does not carry. That file is parsed to check that the scan
really ran (over XMPP STARTTLS where asked), that the certificate was validated against the CA
file given, and which TLS versions the listener accepted, so a scan that silently did nothing
cannot pass.

The dev certificate (self-signed, one year) is fine for ``intermediate`` (366 days at most) but
not for ``modern``, whose 90-day limit sslyze checks as well; the ``modern`` node therefore gets
an 89-day certificate from a throwaway CA instead.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.net.test_tls_scan import write_ca_and_leaf
from tests.nodes import RunningNode, add_users, write_node_config
from villaged.app import run_node
from villaged.config import load_config
from villaged.ops.provision import CERT_NAME, KEY_NAME
from villaged.ops.tlsfiles import write_file_atomic, write_private_file

if TYPE_CHECKING:
    from collections.abc import Callable

    from villaged.config import TlsProfile

SSLYZE = Path(__file__).resolve().parents[2] / ".venv-sslyze" / "bin" / "sslyze"
SCAN_TIMEOUT_S = 40  # a scan of one listener takes about a second here

# `make test` builds sslyze's environment, so under CI a missing one is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not SSLYZE.exists() and not os.environ.get("CI"),
    reason="sslyze's environment is absent: run `bash tests/net/sslyze_env.sh`",
)

# sslyze opens a few hundred short connections from 127.0.0.1 (several at a time): none of them
# may be turned away by the per-IP limit, or a refusal would read as a rejected cipher suite.
LIMITS_TOML = "[c2s]\nmax_connections_per_ip = 10000"
# Events the node logs when it turns a connection away for its own limits, not for TLS.
LIMIT_EVENTS = {"c2s.too_many_connections", "c2s.rate_limited"}

TLS_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")
ACCEPTED_VERSIONS: dict[str, set[str]] = {
    "intermediate": {"tls_1_2", "tls_1_3"},
    "modern": {"tls_1_3"},
}
ALLOWED_GROUPS = {"X25519", "secp256r1", "secp384r1"}


@dataclass(frozen=True)
class Scan:
    """One sslyze run against one listener: its exit status, console report and JSON result."""

    returncode: int
    report: str
    result: dict[str, Any]  # the single entry of the JSON output's server_scan_results

    def accepted_versions(self) -> set[str]:
        commands = self.result["scan_result"]
        return {
            version
            for version in TLS_VERSIONS
            if commands[f"{version}_cipher_suites"]["result"]["is_tls_version_supported"]
        }

    def supported_groups(self) -> set[str]:
        curves = self.result["scan_result"]["elliptic_curves"]["result"]
        return {curve["name"] for curve in curves["supported_curves"]}

    def trusted_by_ca_file(self) -> bool:
        certificate_info = self.result["scan_result"]["certificate_info"]["result"]
        return all(
            any(
                validation["trust_store"]["name"] == "Supplied CA file"
                and validation["was_validation_successful"]
                for validation in deployment["path_validation_results"]
            )
            for deployment in certificate_info["certificate_deployments"]
        )

    def verdict(self) -> str:
        """sslyze's compliance section, or the whole report when it printed none."""
        start = self.report.find("COMPLIANCE AGAINST")
        return self.report[start:] if start >= 0 else self.report


async def sslyze(
    port: int, ca_file: Path, profile: TlsProfile, json_out: Path, *, starttls: bool
) -> Scan:
    """Scan ``localhost:port`` (connecting to 127.0.0.1) against Mozilla's ``profile``."""
    command = [str(SSLYZE)]
    if starttls:
        command += ["--starttls=xmpp", "--xmpp_to=localhost"]
    command += [
        f"--mozilla_config={profile}",
        f"--certinfo_ca_file={ca_file}",
        f"--json_out={json_out}",
        # "localhost:PORT{127.0.0.1}": connect to 127.0.0.1, validate the name localhost.
        f"localhost:{port}{{127.0.0.1}}",
    ]
    with trio.fail_after(SCAN_TIMEOUT_S):
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    report = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    return load_scan(done.returncode, report, json_out)


def load_scan(returncode: int, report: str, json_out: Path) -> Scan:
    assert json_out.exists(), report
    results = json.loads(json_out.read_text())["server_scan_results"]
    assert len(results) == 1, report
    return Scan(returncode, report, results[0])


def assert_compliant(scan: Scan, port: int, profile: TlsProfile, *, starttls: bool) -> None:
    result = scan.result
    assert result["connectivity_status"] == "COMPLETED", result["connectivity_error_trace"]
    assert result["scan_status"] == "COMPLETED", scan.report
    network = result["network_configuration"]
    assert network["tls_opportunistic_encryption"] == ("XMPP" if starttls else None)
    assert network["xmpp_to_hostname"] == ("localhost" if starttls else None)
    errors = {
        name: command["error_reason"]
        for name, command in result["scan_result"].items()
        if command["status"] not in {"COMPLETED", "NOT_SCHEDULED"}
    }
    assert not errors, scan.report
    # The verdict itself: sslyze exits with 1 on "FAILED - Not compliant." or an incomplete scan.
    verdict = scan.verdict()
    assert scan.returncode == 0, verdict
    assert f'Mozilla\'s "{profile}" configuration' in verdict, verdict
    assert f"localhost:{port}: OK - Compliant." in verdict, verdict
    # What the verdict rests on, from the JSON result.
    assert scan.trusted_by_ca_file(), scan.report
    assert scan.accepted_versions() == ACCEPTED_VERSIONS[profile], scan.report
    assert scan.supported_groups() <= ALLOWED_GROUPS, scan.report
    assert not result["scan_result"]["tls_compression"]["result"]["supports_compression"]


async def start_scanned_node(
    nursery: trio.Nursery, directory: Path, edit: Callable[[Path], None] | None = None
) -> RunningNode:
    """``tests.nodes.start_node`` with the per-IP limit raised and ``edit`` applied to the
    node's directory (given its config file) before the config is loaded."""
    config_file = write_node_config(directory, LIMITS_TOML)
    if edit is not None:
        edit(config_file)
    config = load_config(config_file)
    await add_users(config, ())
    node = await nursery.start(partial(run_node, config, handle_signals=False))
    return RunningNode(node, config, config.listeners.c2s.bind[0].port)


def assert_closed(*ports: int) -> None:
    """Nothing listens on ``ports`` any more: the node let go of its sockets."""
    for port in ports:
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))


def limit_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if getattr(record, "event", None) in LIMIT_EVENTS
    ]


async def scan_both_listeners(
    running: RunningNode, ca_file: Path, profile: TlsProfile, out: Path
) -> None:
    for starttls, port in ((True, running.c2s), (False, running.c2s_tls)):
        scan = await sslyze(port, ca_file, profile, out / f"{port}.json", starttls=starttls)
        assert_compliant(scan, port, profile, starttls=starttls)


async def test_sslyze_finds_live_c2s_listeners_intermediate_compliant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dev node as `make run` makes it: [tls] profile = "intermediate", dev certificate."""
    async with trio.open_nursery() as nursery:
        running = await start_scanned_node(nursery, tmp_path / "node")
        assert running.config.tls.profile == "intermediate"
        await scan_both_listeners(running, running.ca_file, "intermediate", tmp_path)
        nursery.cancel_scope.cancel()
    assert not limit_events(caplog)
    assert_closed(running.c2s, running.c2s_tls)


async def test_sslyze_finds_live_c2s_listeners_modern_compliant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[tls] profile = "modern", with a certificate short-lived enough for Mozilla's modern."""
    ca_file, cert_file, key_file = write_ca_and_leaf(tmp_path, "ecdsa")

    def modern_with_short_certificate(config_file: Path) -> None:
        text = config_file.read_text()
        assert text.count('profile = "intermediate"') == 1, text
        config_file.write_text(text.replace('profile = "intermediate"', 'profile = "modern"'))
        directory = config_file.parent
        write_file_atomic(directory / CERT_NAME, cert_file.read_bytes(), 0o644)
        write_private_file(directory / KEY_NAME, key_file.read_bytes())

    async with trio.open_nursery() as nursery:
        running = await start_scanned_node(
            nursery, tmp_path / "node", modern_with_short_certificate
        )
        assert running.config.tls.profile == "modern"
        await scan_both_listeners(running, ca_file, "modern", tmp_path)
        nursery.cancel_scope.cancel()
    assert not limit_events(caplog)
    assert_closed(running.c2s, running.c2s_tls)
