"""check_config_files: the certificate, its key and the keyset that a config names."""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from villaged.config import Config, ConfigError, check_config_files, load_config
from villaged.ops.tlsfiles import make_self_signed

if TYPE_CHECKING:
    from pathlib import Path

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)

CONFIG = """\
[server]
domain = "example.org"

[storage]
keyset = "keys/keyset.json"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
"""


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config whose files all exist and are fine."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "keys").mkdir()
    cert_pem, key_pem = make_self_signed("example.org", NOW)
    (tmp_path / "tls/cert.pem").write_bytes(cert_pem)
    write_private(tmp_path / "tls/key.pem", key_pem)
    write_private(tmp_path / "keys/keyset.json", b"{}")
    path = tmp_path / "villaged.toml"
    path.write_text(CONFIG)
    return load_config(path)


def write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def problem(config: Config) -> str:
    with pytest.raises(ConfigError) as caught:
        check_config_files(config)
    message = str(caught.value)
    assert message.startswith(f"{config.source}: ")
    assert "\n" not in message
    return message.removeprefix(f"{config.source}: ")


def test_good_files_pass(config: Config) -> None:
    check_config_files(config)


def test_a_full_chain_passes(config: Config) -> None:
    cert_pem = config.tls.cert.read_bytes()
    other_cert, _ = make_self_signed("ca.example.org", NOW)
    config.tls.cert.write_bytes(cert_pem + other_cert)
    check_config_files(config)


def test_a_stricter_key_mode_passes(config: Config) -> None:
    config.tls.key.chmod(0o400)
    config.storage.keyset.chmod(0o400)
    check_config_files(config)


def test_missing_certificate(config: Config) -> None:
    config.tls.cert.unlink()
    assert problem(config) == f"tls.cert: file {config.tls.cert} does not exist"


def test_certificate_that_is_not_pem(config: Config) -> None:
    config.tls.cert.write_bytes(b"not a certificate\n")
    assert problem(config) == f"tls.cert: file {config.tls.cert} is not a PEM X.509 certificate"


def test_certificate_that_is_a_directory(config: Config) -> None:
    config.tls.cert.unlink()
    config.tls.cert.mkdir()
    assert problem(config) == f"tls.cert: {config.tls.cert} is not a regular file"


def test_certificate_below_a_file(config: Config, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    config = load_config_with(config, 'cert = "tls/cert.pem"', 'cert = "blocker/cert.pem"')
    assert problem(config) == (
        f"tls.cert: cannot open file {blocker / 'cert.pem'}: Not a directory"
    )


def load_config_with(config: Config, old: str, new: str) -> Config:
    config.source.write_text(config.source.read_text().replace(old, new))
    return load_config(config.source)


def test_missing_key(config: Config) -> None:
    config.tls.key.unlink()
    assert problem(config) == f"tls.key: file {config.tls.key} does not exist"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700])
def test_key_readable_by_others(config: Config, mode: int) -> None:
    config.tls.key.chmod(mode)
    assert problem(config) == (
        f"tls.key: file {config.tls.key} has mode {mode:04o}; it must be 0600"
    )


def test_key_that_is_not_pem(config: Config) -> None:
    write_private(config.tls.key, config.tls.cert.read_bytes())
    assert problem(config) == f"tls.key: file {config.tls.key} is not a PEM private key"


def test_encrypted_key(config: Config) -> None:
    key = serialization.load_pem_private_key(config.tls.key.read_bytes(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    write_private(config.tls.key, encrypted)
    assert problem(config) == (
        f"tls.key: file {config.tls.key} holds an encrypted key; it must be unencrypted"
    )


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_key_of_another_certificate(config: Config, kind: str) -> None:
    other = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    write_private(config.tls.key, pem)
    assert problem(config) == (
        f"tls.key: file {config.tls.key} is not the key of the certificate in "
        f"{config.tls.cert} (tls.cert)"
    )


def test_missing_keyset(config: Config) -> None:
    config.storage.keyset.unlink()
    assert problem(config) == f"storage.keyset: file {config.storage.keyset} does not exist"


def test_keyset_readable_by_group(config: Config) -> None:
    config.storage.keyset.chmod(0o640)
    assert problem(config) == (
        f"storage.keyset: file {config.storage.keyset} has mode 0640; it must be 0600"
    )


def test_keyset_replaced_by_a_fifo_does_not_hang(config: Config) -> None:
    config.storage.keyset.unlink()
    os.mkfifo(config.storage.keyset, 0o600)
    assert problem(config) == f"storage.keyset: {config.storage.keyset} is not a regular file"
