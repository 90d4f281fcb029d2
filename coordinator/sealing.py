"""Encryption at rest: values sealed with AES-256-GCM before they are written.

A sealed value is text::

    enc1:<key id>:<base64url(12-byte random nonce || ciphertext || 16-byte tag)>

The associated data is ``<tenant> <table> <row> <column>`` (separated by 0x1F), so a
ciphertext copied into another row, column or tenant does not decrypt. The first key of a
``Sealer`` seals; every key opens (rotation: add the new key first, run
``trellis secrets rotate-key``, then drop the old one). A value without the ``enc1:``
prefix was written before encryption existed: the store seals such values when it opens
the database, and refuses them afterwards (``trellis secrets rotate-key`` seals what an
older replica wrote during a rolling upgrade).

Keys come from ``TRELLIS_ENCRYPTION_KEYS`` (``kid:base64key,...``) or the file named by
``TRELLIS_ENCRYPTION_KEYS_FILE`` (same format, e.g. a mounted Kubernetes Secret). With
neither, the store derives a key from the server secret kept in the database
(``derived_key``): values are still unreadable without that database, but a dump of the
database carries its own key — the coordinator warns and says so in its health.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc1:"
DERIVED_KID = "db"
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_NONCE = 12


class SealingError(ValueError):
    """A key setting that cannot be used, or a sealed value that does not open."""


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """``kid:base64key,kid:base64key`` (first = current; whitespace and newlines allowed
    between entries) into ``(kid, 32-byte key)`` pairs; ``SealingError`` names the problem."""
    keys: list[tuple[str, bytes]] = []
    for n, part in enumerate(p for p in re.split(r"[,\s]+", text.strip()) if p):
        kid, sep, b64 = part.partition(":")
        if not sep or not _KID.match(kid):
            # Never echo the entry: without its "kid:" it is the key itself.
            raise SealingError(
                f"encryption key entry {n + 1}: expected kid:base64key with a key id of "
                "letters, digits, '.', '_' or '-' (at most 32)"
            )
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), altchars=b"-_", validate=False)
        except (binascii.Error, ValueError) as exc:
            raise SealingError(f"encryption key {kid!r} is not base64") from exc
        if len(key) != 32:
            raise SealingError(
                f"encryption key {kid!r} is {len(key)} bytes; it must be 32 bytes (AES-256), "
                "e.g. from `openssl rand -base64 32`"
            )
        if any(k == kid for k, _ in keys):
            raise SealingError(f"encryption key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise SealingError("no encryption key given; expected kid:base64key,...")
    return keys


def new_key_text(kid: str = "k1") -> str:
    """A fresh ``kid:base64key`` entry (for ``trellis secrets new-key`` and the docs)."""
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


def derived_key(server_secret: str) -> bytes:
    """The key used when none is configured: HKDF-like derivation from the server secret."""
    return hmac.new(
        server_secret.encode(), b"trellis at-rest encryption v1", hashlib.sha256
    ).digest()


def _aad(tenant: str, table: str, row: str, column: str) -> bytes:
    return "\x1f".join((tenant, table, row, column)).encode()


class Sealer:
    """Seals and opens values for one (tenant, table, row, column)."""

    def __init__(self, keys: Sequence[tuple[str, bytes]], *, derived: bool = False) -> None:
        if not keys:
            raise SealingError("a Sealer needs at least one key")
        self._current = keys[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keys}
        # True when the key comes from the database itself (no key configured).
        self.derived = derived
        # Values without the prefix are read as plaintext until the store has sealed them.
        self.accept_plaintext = True

    @property
    def current_kid(self) -> str:
        return self._current

    def forget(self, kid: str) -> None:
        """Stop opening values sealed under ``kid`` (never the current key)."""
        if kid != self._current:
            self._keys.pop(kid, None)

    def seal(self, plaintext: str, tenant: str, table: str, row: str, column: str) -> str:
        nonce = os.urandom(_NONCE)
        ct = self._keys[self._current].encrypt(
            nonce, plaintext.encode(), _aad(tenant, table, row, column)
        )
        return f"{PREFIX}{self._current}:{base64.urlsafe_b64encode(nonce + ct).decode()}"

    def open(
        self,
        stored: str,
        tenant: str,
        table: str,
        row: str,
        column: str,
        *,
        plaintext_ok: bool = False,
    ) -> str:
        """The plaintext of ``stored``. A value without the ``enc1:`` prefix is returned as
        it is only when ``plaintext_ok`` or ``accept_plaintext`` (before the store sealed
        the rows of older releases): otherwise it is refused, so that a value written
        into the database in plaintext cannot stand in for a sealed one."""
        if not stored.startswith(PREFIX):
            if plaintext_ok or self.accept_plaintext:
                return stored
            raise SealingError(
                f"{table}.{column} of {row!r} (tenant {tenant!r}) is stored unencrypted: "
                "written by an older release during an upgrade, or altered in the "
                "database; run `trellis secrets rotate-key` to encrypt what older releases "
                "wrote"
            )
        kid, _, body = stored[len(PREFIX) :].partition(":")
        aead = self._keys.get(kid)
        if aead is None:
            raise SealingError(
                f"{table}.{column} of {row!r} (tenant {tenant!r}) is sealed with key {kid!r}, "
                "which is not configured; add it back to TRELLIS_ENCRYPTION_KEYS"
            )
        try:
            raw = base64.urlsafe_b64decode(body)
            return aead.decrypt(
                raw[:_NONCE], raw[_NONCE:], _aad(tenant, table, row, column)
            ).decode()
        except (InvalidTag, ValueError, binascii.Error) as exc:
            raise SealingError(
                f"{table}.{column} of {row!r} (tenant {tenant!r}) does not decrypt with key "
                f"{kid!r}: the value was altered or moved from another row"
            ) from exc

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(PREFIX)
