"""The broker's key files: one secret per purpose, none of them stored in Redis.

- ``signing``: Ed25519 private key (PEM) that mints dispatch tokens and leases.
- ``public``: the keyring workers verify with: one or more PEM public keys, the current signing
  key's first. ``intake keys rotate`` puts a new key in front and keeps the old one until
  ``intake keys retire KID``.
- ``audit``: 32-byte HMAC key that seals the audit chain.
- ``secrets``: 32-byte AES-GCM key that encrypts approvers' TOTP secrets at rest.
- ``keys/workers/NAME.key``: one agent worker's report key, issued by the broker
  (``intake worker-key issue NAME``), derived one-way from the audit key and the worker's key
  generation, so revoking (a new generation) kills the old file.
- ``console``: 32-byte AES-GCM key that encrypts the web console's session cookies.

Private files are written with mode 0600 (atomically: temp file, fsync, rename) and refused on
load when group or others can read them.
"""

from __future__ import annotations

import base64
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intake.core.errors import ConfigError
from intake.core.files import write_atomic
from intake.core.settings import Settings

if TYPE_CHECKING:
    from intake.protocol.tokens import Keyring

_VARS = {
    "signing": "INTAKE_SIGNING_KEY",
    "public": "INTAKE_PUBLIC_KEY",
    "audit": "INTAKE_AUDIT_KEY",
    "secrets": "INTAKE_SECRETS_KEY",
    "worker": "INTAKE_WORKER_KEY",
    "console": "INTAKE_CONSOLE_KEY",
}


def _pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_keys(settings: Settings, *, force: bool = False) -> dict[str, Path]:
    """Write every key file. Refuses to overwrite any existing one unless ``force``.

    Overwriting the audit key makes the existing chain unverifiable, hence the guard.
    """
    paths = settings.keys
    existing = [p for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"key file {existing[0]} already exists (use --force to replace every key)")
    private = Ed25519PrivateKey.generate()
    write_atomic(paths["signing"], _pem_private(private), 0o600)
    write_atomic(paths["public"], _pem_public(private.public_key()), 0o644)
    write_atomic(paths["audit"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    write_atomic(paths["secrets"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    write_atomic(paths["console"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    return paths


def ensure_keys(settings: Settings) -> bool:
    """Dev mode: generate keys on first run. Returns True when it generated them."""
    paths = settings.keys
    if all(p.exists() for p in paths.values()):
        return False
    if all(p.exists() for purpose, p in paths.items() if purpose != "console"):
        # A data dir from before the console had its own key: add it, keep everything else.
        write_atomic(paths["console"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
        return True
    generate_keys(settings, force=False)
    return True


def rotate_signing_key(settings: Settings) -> tuple[str, str]:
    """A new signing key; the keyring keeps the old public key (verifiers accept both) until
    :func:`retire_public_key`. Returns (new key id, old key id)."""
    from intake.protocol.tokens import key_id

    old = load_signing_key(settings)
    new = Ed25519PrivateKey.generate()
    ring = load_public_keys(settings.keys["public"])
    others = [k for kid, k in ring.keys.items() if kid != key_id(new.public_key())]
    # The keyring first, so a verifier never sees a token whose key it does not have yet.
    write_atomic(settings.keys["public"], b"".join(_pem_public(k) for k in [new.public_key(), *others]), 0o644)
    write_atomic(settings.keys["signing"], _pem_private(new), 0o600)
    return key_id(new.public_key()), key_id(old.public_key())


def retire_public_key(settings: Settings, kid: str) -> None:
    """Drop ``kid`` from the keyring (never the current signing key's)."""
    from intake.protocol.tokens import key_id

    ring = load_public_keys(settings.keys["public"])
    if kid not in ring.keys:
        raise ConfigError(f"no key {kid} in {settings.keys['public']}")
    if kid == key_id(load_signing_key(settings).public_key()):
        raise ConfigError(f"key {kid} is the current signing key; rotate first")
    kept = [k for k_id, k in ring.keys.items() if k_id != kid]
    write_atomic(settings.keys["public"], b"".join(_pem_public(k) for k in kept), 0o644)


def write_worker_key(path: Path, worker: str, generation: int, key: bytes) -> None:
    """A worker's report key file: ``NAME GENERATION BASE64KEY`` on one line, mode 0600."""
    write_atomic(path, f"{worker} {generation} {base64.b64encode(key).decode()}\n".encode(), 0o600)


def load_worker_key(path: Path) -> tuple[str, int, bytes]:
    """(worker name, key generation, key) from a worker key file, or ConfigError."""
    raw = _read_private("worker", path).decode("utf-8", "replace").strip()
    try:
        name, gen, b64 = raw.split(" ")
        key = base64.b64decode(b64, validate=True)
        generation = int(gen)
    except ValueError:
        raise ConfigError(f"INTAKE_WORKER_KEY: {path} is not a worker key file") from None
    if len(key) != 32 or generation < 1:
        raise ConfigError(f"INTAKE_WORKER_KEY: {path} is not a worker key file")
    return name, generation, key


def _read_private(purpose: str, path: Path) -> bytes:
    var = _VARS[purpose]
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{var}: no key file at {path} (run `intake keys generate`)") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"{var}: {path} is readable by group or others (chmod 600 it)")
    return path.read_bytes()


def load_secret(settings: Settings, purpose: str) -> bytes:
    """A 32-byte symmetric key (``audit``, ``secrets`` or ``console``)."""
    raw = _read_private(purpose, settings.keys[purpose])
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{_VARS[purpose]}: {settings.keys[purpose]} is not a base64 32-byte key")
    return key


def load_signing_key(settings: Settings) -> Ed25519PrivateKey:
    raw = _read_private("signing", settings.keys["signing"])
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except ValueError:
        raise ConfigError(f"INTAKE_SIGNING_KEY: {settings.keys['signing']} is not a PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"INTAKE_SIGNING_KEY: {settings.keys['signing']} is not an Ed25519 key")
    return key


def load_public_keys(path: Path) -> Keyring:
    """The keyring a worker verifies with: every PEM public key in the file."""
    from intake.protocol.tokens import Keyring

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"INTAKE_PUBLIC_KEY: no key file at {path}") from None
    blocks = [b for b in raw.split(b"-----END PUBLIC KEY-----") if b.strip()]
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block + b"-----END PUBLIC KEY-----\n")
        except ValueError:
            raise ConfigError(f"INTAKE_PUBLIC_KEY: {path} is not a PEM public key file") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"INTAKE_PUBLIC_KEY: {path} holds a key that is not Ed25519")
        keys.append(key)
    if not keys:
        raise ConfigError(f"INTAKE_PUBLIC_KEY: {path} holds no public key")
    return Keyring.of(*keys)
