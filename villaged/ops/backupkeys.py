"""The keyset, wrapped for backups: readable only with a recovery key kept off the host.

A backup must not hold the keyset in the clear — whoever reads the backup would read every
user's data. Yet a disaster that takes the host takes the keyset with it. The answer is a
recovery key pair: ``villaged backup keygen --out FILE`` makes an X25519 private key (FILE,
0600: keep it offline, e.g. in the operators' safe) and its public key (FILE.pub). With
``[backup] keyset_recipient = FILE.pub`` every backup carries ``keyset.wrapped``: the keyset file
encrypted to that public key, so the host can make backups it cannot itself open.

The wrapping is ECIES in the HPKE mould: a fresh X25519 key pair per backup, the shared secret
through HKDF-SHA256 (salt: both public keys; info: a version label) into an AES-256-GCM key,
a random 96-bit nonce, and associated data naming the domain, so a wrapped keyset cannot pass
for another domain's. The blob is JSON::

    {"alg": "X25519-HKDF-SHA256-AES256GCM", "recipient_sha256": hex, "epk": b64, "nonce": b64,
     "ciphertext": b64}

The file is listed (size, SHA-256) in the signed manifest like every other file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from villaged.ops.tlsfiles import write_file_atomic, write_private_file

if TYPE_CHECKING:
    from pathlib import Path

ALGORITHM: Final = "X25519-HKDF-SHA256-AES256GCM"
WRAPPED_KEYSET: Final = "keyset.wrapped"
_INFO: Final = b"villaged backup keyset v1"
#: A keyset file is a few KiB; a wrapped one larger than this is not ours.
MAX_WRAPPED_BYTES: Final = 1 << 20


class RecoveryKeyError(Exception):
    """A recovery key or wrapped keyset is missing, malformed or does not match; the message
    names the file."""


def generate_recovery_key(private_path: Path) -> Path:
    """Write a new private key to ``private_path`` (0600, refusing to overwrite) and its
    public key beside it (``.pub``, 0644); the public key's path."""
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        # Either one: a backup node may name the .pub in keyset_recipient while its private
        # half is already offline; replacing it would wrap future keysets to a lost key.
        if os.path.lexists(path):
            raise RecoveryKeyError(f"{path} already exists; not overwriting a recovery key")
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private_file(private_path, private_pem)
    write_file_atomic(public_path, public_pem, 0o644)
    return public_path


def wrap_keyset(keyset_bytes: bytes, recipient: Path, domain: str) -> bytes:
    """``keyset_bytes`` (the keyset file) encrypted to the public key in ``recipient``."""
    public = _load_public(recipient)
    ephemeral = X25519PrivateKey.generate()
    epk = _raw(ephemeral.public_key())
    key = _derive(ephemeral.exchange(public), epk, _raw(public))
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, keyset_bytes, _associated(domain))
    document = {
        "alg": ALGORITHM,
        "recipient_sha256": hashlib.sha256(_raw(public)).hexdigest(),
        "epk": base64.b64encode(epk).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }
    return json.dumps(document, sort_keys=True).encode() + b"\n"


def unwrap_keyset(wrapped: Path, private_key: Path, domain: str) -> bytes:
    """The keyset file's bytes from ``wrapped``, opened with the recovery key."""
    try:
        if wrapped.stat().st_size > MAX_WRAPPED_BYTES:
            raise RecoveryKeyError(f"{wrapped}: larger than {MAX_WRAPPED_BYTES} bytes")
        document = json.loads(wrapped.read_bytes())
        if document["alg"] != ALGORITHM:
            raise RecoveryKeyError(f"{wrapped}: algorithm {document['alg']!r} is not {ALGORITHM}")
        epk = base64.b64decode(document["epk"], validate=True)
        nonce = base64.b64decode(document["nonce"], validate=True)
        ciphertext = base64.b64decode(document["ciphertext"], validate=True)
        recipient_hash = str(document["recipient_sha256"])
    except FileNotFoundError:
        raise RecoveryKeyError(f"{wrapped}: missing (the backup holds no wrapped keyset)") from None
    except (ValueError, KeyError, TypeError):
        raise RecoveryKeyError(f"{wrapped}: not a wrapped keyset") from None
    private = _load_private(private_key)
    own = _raw(private.public_key())
    if hashlib.sha256(own).hexdigest() != recipient_hash:
        raise RecoveryKeyError(f"{private_key}: not the recovery key {wrapped} was wrapped for")
    try:
        key = _derive(private.exchange(X25519PublicKey.from_public_bytes(epk)), epk, own)
        return AESGCM(key).decrypt(nonce, ciphertext, _associated(domain))
    except (ValueError, InvalidTag):
        raise RecoveryKeyError(f"{wrapped}: does not open (damaged, or another domain's)") from None


def _derive(shared: bytes, epk: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=epk + recipient, info=_INFO).derive(shared)


def _associated(domain: str) -> bytes:
    return b"villaged-backup-keyset\x00" + domain.encode()


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_public(path: Path) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise RecoveryKeyError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError:
        raise RecoveryKeyError(f"{path}: not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise RecoveryKeyError(f"{path}: not an X25519 public key (villaged backup keygen)")
    return key


def _load_private(path: Path) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise RecoveryKeyError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, TypeError):
        raise RecoveryKeyError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise RecoveryKeyError(f"{path}: not an X25519 private key (villaged backup keygen)")
    return key
