"""The broker's key files: one secret per purpose, none of them stored in Redis.

- ``signing``: Ed25519 private key (PEM) that mints capability tokens; workers get ``public``.
- ``audit``: 32-byte HMAC key that seals the audit chain.
- ``secrets``: 32-byte AES-GCM key that encrypts approvers' TOTP secrets at rest.
- ``worker_events``: the key agent workers MAC their audit events with, derived one-way from
  the audit key (workers get this file, never the audit key).
- ``console``: 32-byte AES-GCM key that encrypts the web console's session cookies.

Private files are written with mode 0600 (atomically: temp file, fsync, rename) and refused on
load when group or others can read them.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intake.errors import ConfigError
from intake.settings import Settings

_VARS = {
    "signing": "INTAKE_SIGNING_KEY",
    "public": "INTAKE_PUBLIC_KEY",
    "audit": "INTAKE_AUDIT_KEY",
    "secrets": "INTAKE_SECRETS_KEY",
    "worker_events": "INTAKE_WORKER_EVENTS_KEY",
    "console": "INTAKE_CONSOLE_KEY",
}
# Keys that nothing else depends on: a data dir from before they existed gets them added.
_ADDABLE = ("worker_events", "console")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def generate_keys(settings: Settings, *, force: bool = False) -> dict[str, Path]:
    """Write every key file. Refuses to overwrite any existing one unless ``force``.

    Overwriting the audit key makes the existing chain unverifiable, hence the guard.
    """
    paths = settings.keys
    existing = [p for p in paths.values() if p.exists()]
    if existing and not force:
        raise ConfigError(f"key file {existing[0]} already exists (use --force to replace every key)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_atomic(paths["signing"], pem, 0o600)
    _write_atomic(paths["public"], pub, 0o644)
    audit_key = secrets.token_bytes(32)
    _write_atomic(paths["audit"], base64.b64encode(audit_key) + b"\n", 0o600)
    _write_atomic(paths["secrets"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    _write_worker_events_key(paths["worker_events"], audit_key)
    _write_atomic(paths["console"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
    return paths


def _write_worker_events_key(path: Path, audit_key: bytes) -> None:
    from intake.audit import worker_events_key

    _write_atomic(path, base64.b64encode(worker_events_key(audit_key)) + b"\n", 0o600)


def ensure_keys(settings: Settings) -> bool:
    """Dev mode: generate keys on first run. Returns True when it generated them."""
    paths = settings.keys
    if all(p.exists() for p in paths.values()):
        return False
    if all(p.exists() for purpose, p in paths.items() if purpose not in _ADDABLE):
        # A data dir from before workers (or the console) had their own key: add what is
        # missing, keep everything else.
        if not paths["worker_events"].exists():
            _write_worker_events_key(paths["worker_events"], load_secret(settings, "audit"))
        if not paths["console"].exists():
            _write_atomic(paths["console"], base64.b64encode(secrets.token_bytes(32)) + b"\n", 0o600)
        return True
    generate_keys(settings, force=False)
    return True


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


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The verify key, all a worker needs."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"INTAKE_PUBLIC_KEY: no key file at {path}") from None
    except ValueError:
        raise ConfigError(f"INTAKE_PUBLIC_KEY: {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"INTAKE_PUBLIC_KEY: {path} is not an Ed25519 key")
    return key
