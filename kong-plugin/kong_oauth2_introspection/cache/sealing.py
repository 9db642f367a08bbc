"""Sealing the values the Redis store keeps: AES-GCM under a key derived from
the store's secret, bound to the key each value is stored under (the AAD), so a
value moved to another key, or written without the secret, opens as nothing."""

import os
from typing import Optional

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12


class Sealer:
    """AES-GCM with a 16, 24 or 32-byte key.

    A sealed value is ``nonce (12 random bytes) || ciphertext || tag``. The
    associated data (the store passes the Redis key) binds a value to its key:
    a value copied under another key does not open.
    """

    def __init__(self, secret):
        key = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(key) not in (16, 24, 32):
            raise ValueError("the store secret must be 16, 24 or 32 bytes long")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, blob: bytes, aad: bytes) -> Optional[bytes]:
        """The plaintext, or None when ``blob`` was tampered with, sealed with
        another key or for other associated data."""
        if not isinstance(blob, (bytes, bytearray)) or len(blob) < NONCE_SIZE + 16:
            return None
        try:
            return self._aead.decrypt(bytes(blob[:NONCE_SIZE]), bytes(blob[NONCE_SIZE:]), aad)
        except Exception:  # InvalidTag, or anything else: a miss
            return None
