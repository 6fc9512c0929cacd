"""init_dev and the file helpers it is built on (atomic writes, self-signed certificates)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from villaged.config import Endpoint, check_config_files, load_config
from villaged.ops.provision import DEV_PORT_OFFSETS, init_dev
from villaged.ops.tlsfiles import make_self_signed, write_file_atomic, write_private_file
from villaged.storage.crypto import Keyset

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
FILES = ("villaged.toml", "tls/cert.pem", "tls/key.pem", "keys/keyset.json")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The loosest umask: file modes must come from the code, not from the environment."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def contents(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


# --- init_dev ----------------------------------------------------------------------------------


def test_init_writes_a_config_that_loads_and_checks(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    result = init_dev(directory, now=NOW)
    assert result.directory == directory
    assert result.config == directory / "villaged.toml"
    assert sorted(result.created) == sorted(directory / name for name in FILES)
    assert result.kept == ()

    config = load_config(result.config)
    check_config_files(config)
    assert config.server.domain == "localhost"
    assert config.tls.cert == directory.absolute() / "tls/cert.pem"
    assert config.tls.key == directory.absolute() / "tls/key.pem"
    assert config.storage.keyset == directory.absolute() / "keys/keyset.json"
    assert config.storage.dir == directory.absolute() / "data"
    Keyset.load(config.storage.keyset)


@pytest.mark.parametrize("port_base", [5222, 1, 20000, 65529])
def test_listener_ports_follow_the_port_base(tmp_path: Path, port_base: int) -> None:
    config = load_config(init_dev(tmp_path / "dev", port_base=port_base, now=NOW).config)
    ports = {name: listener.bind for name, listener in config.listeners.by_name().items()}
    assert ports == {
        "c2s": (Endpoint("127.0.0.1", port_base),),
        "c2s_tls": (Endpoint("127.0.0.1", port_base + 1),),
        "websocket": (Endpoint("127.0.0.1", port_base + 2),),
        "http": (Endpoint("127.0.0.1", port_base + 3),),
        "s2s": (Endpoint("127.0.0.1", port_base + 4),),
        "s2s_tls": (Endpoint("127.0.0.1", port_base + 5),),
        "cluster": (Endpoint("127.0.0.1", port_base + 6),),
    }
    assert set(DEV_PORT_OFFSETS) == set(ports)


@pytest.mark.parametrize("port_base", [0, -5, 65530, 70000])
def test_port_base_must_leave_room_for_seven_ports(tmp_path: Path, port_base: int) -> None:
    with pytest.raises(ValueError, match=r"it must be from 1 to 65529$") as caught:
        init_dev(tmp_path / "dev", port_base=port_base, now=NOW)
    assert f"port base {port_base} does not leave room for 7 ports" in str(caught.value)
    assert not (tmp_path / "dev").exists()


@pytest.mark.parametrize("domain", ["Example.org", "example", "127.0.0.1", 'x".org'])
def test_domain_must_be_usable(tmp_path: Path, domain: str) -> None:
    with pytest.raises(ValueError, match=rf"^domain {domain!r} is not usable: "):
        init_dev(tmp_path / "dev", domain=domain, now=NOW)
    assert not (tmp_path / "dev").exists()


def test_now_must_be_timezone_aware(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        init_dev(tmp_path / "dev", now=dt.datetime(2026, 1, 1))
    assert not (tmp_path / "dev").exists()


def test_init_for_a_domain(tmp_path: Path) -> None:
    result = init_dev(tmp_path / "dev", domain="chat.example.org", now=NOW)
    config = load_config(result.config)
    check_config_files(config)
    assert config.server.domain == "chat.example.org"
    assert dns_names(config.tls.cert.read_bytes()) == [
        "chat.example.org",
        "*.chat.example.org",
        "localhost",
    ]


@pytest.mark.usefixtures("umask_zero")
def test_private_files_are_0600_even_with_umask_zero(tmp_path: Path) -> None:
    directory = tmp_path / "parent" / "dev"
    init_dev(directory, now=NOW)
    assert mode(directory) == 0o700
    assert mode(directory / "tls") == 0o700
    assert mode(directory / "keys") == 0o700
    assert mode(directory / "tls/key.pem") == 0o600
    assert mode(directory / "keys/keyset.json") == 0o600
    assert mode(directory / "tls/cert.pem") == 0o644
    assert mode(directory / "villaged.toml") == 0o644


def test_modes_are_exact_under_a_strict_umask(tmp_path: Path) -> None:
    previous = os.umask(0o277)
    try:
        init_dev(tmp_path / "dev", now=NOW)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "dev") == 0o700
    assert mode(tmp_path / "dev/tls/key.pem") == 0o600
    assert mode(tmp_path / "dev/tls/cert.pem") == 0o644


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    init_dev(directory, now=NOW)
    assert mode(directory) == 0o755


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "dev").write_text("")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        init_dev(tmp_path / "dev", now=NOW)


def test_rerun_keeps_every_file_byte_for_byte(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    init_dev(directory, now=NOW)
    before = contents(directory)
    # Different arguments do not matter: what exists is kept.
    result = init_dev(directory, domain="example.org", port_base=6000, now=NOW)
    assert contents(directory) == before
    assert result.created == ()
    assert sorted(result.kept) == sorted(directory / name for name in FILES)
    check_config_files(load_config(result.config))


def test_force_regenerates_everything(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    init_dev(directory, now=NOW)
    before = contents(directory)
    result = init_dev(directory, domain="example.org", force=True, now=NOW)
    after = contents(directory)
    assert result.kept == ()
    assert sorted(result.created) == sorted(directory / name for name in FILES)
    assert all(after[name] != before[name] for name in FILES)
    config = load_config(result.config)
    check_config_files(config)
    assert config.server.domain == "example.org"
    assert leftovers(directory) == []


def test_a_lost_key_regenerates_its_certificate_only(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    init_dev(directory, now=NOW)
    before = contents(directory)
    (directory / "tls/key.pem").unlink()
    result = init_dev(directory, now=NOW)
    assert sorted(result.created) == [directory / "tls/cert.pem", directory / "tls/key.pem"]
    assert sorted(result.kept) == [directory / "keys/keyset.json", directory / "villaged.toml"]
    after = contents(directory)
    assert after["tls/cert.pem"] != before["tls/cert.pem"]
    assert after["keys/keyset.json"] == before["keys/keyset.json"]
    check_config_files(load_config(result.config))


def test_an_interrupted_run_is_finished_by_the_next(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    init_dev(directory, now=NOW)
    (directory / "villaged.toml").unlink()  # the config is written last
    result = init_dev(directory, now=NOW)
    assert result.created == (directory / "villaged.toml",)
    check_config_files(load_config(result.config))


def leftovers(directory: Path) -> list[Path]:
    return [path for path in directory.rglob(".*") if path.is_file()]


# --- make_self_signed --------------------------------------------------------------------------


def dns_names(cert_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def test_self_signed_certificate_for_localhost() -> None:
    cert_pem, key_pem = make_self_signed("localhost", NOW)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.issuer == cert.subject
    assert b"BEGIN PRIVATE KEY" in key_pem


def test_self_signed_certificate_properties() -> None:
    cert = x509.load_pem_x509_certificate(make_self_signed("example.org", NOW)[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["example.org", "*.example.org", "localhost"]

    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)

    assert cert.not_valid_before_utc <= NOW
    assert NOW - cert.not_valid_before_utc <= dt.timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=365)

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(extended) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def test_self_signed_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_self_signed("localhost", dt.datetime(2026, 1, 1))


def test_each_certificate_has_its_own_key() -> None:
    first, second = make_self_signed("localhost", NOW), make_self_signed("localhost", NOW)
    assert first[1] != second[1]
    assert first[0] != second[0]


# --- atomic writes -----------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_write_private_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private_file(path, b"one")
    assert path.read_bytes() == b"one"
    assert mode(path) == 0o600
    path.chmod(0o644)
    write_private_file(path, b"two")  # replaces the file, so the old mode goes with it
    assert path.read_bytes() == b"two"
    assert mode(path) == 0o600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("wanted", [0o644, 0o640, 0o600, 0o400])
def test_write_file_atomic_sets_exactly_the_mode(tmp_path: Path, wanted: int) -> None:
    previous = os.umask(0o077)
    try:
        write_file_atomic(tmp_path / "f", b"data", wanted)
    finally:
        os.umask(previous)
    assert mode(tmp_path / "f") == wanted


def test_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    write_file_atomic(path, b"old", 0o644)

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", refuse)
        with pytest.raises(OSError, match="No space left"):
            write_file_atomic(path, b"new", 0o644)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_write_into_a_missing_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_private_file(tmp_path / "absent" / "f", b"x")


def test_an_older_dev_config_gets_the_admin_section_once(tmp_path: Path) -> None:
    now = NOW
    result = init_dev(tmp_path / "dev", now=now)
    text = result.config.read_text()
    start = text.index("[admin]")
    end = text.index("[log]")
    result.config.write_text(text[:start] + text[end:])  # as written before [admin] existed
    init_dev(tmp_path / "dev", now=now)
    init_dev(tmp_path / "dev", now=now)
    again = result.config.read_text()
    assert again.count("[admin]") == 1
    assert load_config(result.config).admin.socket == tmp_path / "dev" / "admin.sock"
