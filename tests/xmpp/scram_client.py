"""An independent SCRAM client for tests, written from RFC 5802 §3 and §7."""

import base64
import hashlib
import hmac

_DIGESTS = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


class ScramClient:
    """A SCRAM client written from RFC 5802 §3 and §7, sharing no code with the server.

    Passwords given to it are already in their prepared form (the tests use NFC text that
    OpaqueString leaves alone), so it hashes their UTF-8 bytes directly.
    """

    def __init__(
        self,
        mechanism: str,
        username: str,
        password: str,
        client_nonce: str = "cLiEnTnOnCe-42",
        *,
        gs2_header: str = "n,,",
        final_extension: str = "",
    ) -> None:
        self.digest = _DIGESTS[mechanism]
        self.username = username
        self.password = password
        self.client_nonce = client_nonce
        self.gs2_header = gs2_header
        self.final_extension = final_extension
        self.first_bare = ""
        self.expected_server_signature = b""

    def client_first(self) -> bytes:
        name = self.username.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={name},r={self.client_nonce}"
        return (self.gs2_header + self.first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        fields = dict(item.split("=", 1) for item in text.split(","))
        assert fields["r"].startswith(self.client_nonce)
        assert len(fields["r"]) > len(self.client_nonce)
        salted = hi(
            self.digest, self.password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
        )
        client_key = hmac.new(salted, b"Client Key", self.digest).digest()
        stored_key = hashlib.new(self.digest, client_key).digest()
        binding = base64.b64encode(self.gs2_header.encode()).decode()
        without_proof = f"c={binding},r={fields['r']}{self.final_extension}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, self.digest).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.new(salted, b"Server Key", self.digest).digest()
        self.expected_server_signature = hmac.new(server_key, auth_message, self.digest).digest()
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def server_final_is_genuine(self, additional_data: bytes | None) -> bool:
        expected = b"v=" + base64.b64encode(self.expected_server_signature)
        return additional_data is not None and hmac.compare_digest(additional_data, expected)


def hi(digest: str, password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi() of RFC 5802 §2.2, spelled out rather than borrowed from hashlib.pbkdf2_hmac."""
    block = hmac.new(password, salt + b"\x00\x00\x00\x01", digest).digest()
    result = int.from_bytes(block, "big")
    for _ in range(iterations - 1):
        block = hmac.new(password, block, digest).digest()
        result ^= int.from_bytes(block, "big")
    return result.to_bytes(len(block), "big")
