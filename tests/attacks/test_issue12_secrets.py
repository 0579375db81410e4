"""Issue 12 attacks on secrets at rest: the ``INTAKE_SECRETS_DIR`` files and ``intake redis
aclfile``'s output, as another local user on the broker's host would meet them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from intake.core.settings import Settings, load_settings
from intake.operations.doctor import run_doctor
from tests.conftest import REPO_ROOT


def test_redis_aclfile_output_holds_no_password_and_urls_are_private(tmp_path: Path) -> None:
    out = tmp_path / "acl"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-m", "intake", "redis", "aclfile", str(out), "--worker", "w1"],
                   check=True, capture_output=True, timeout=60, env=env, cwd=tmp_path)
    acl = (out / "users.acl").read_text()
    urls = sorted(out.glob("*.url"))
    assert len(urls) == 3  # broker, readonly, worker-w1
    for url in urls:
        assert stat.S_IMODE(url.stat().st_mode) == 0o600
        password = url.read_text().strip().split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        assert len(password) >= 32 and password not in acl
    assert ">" not in acl  # no plain-text password rule at all, only #<sha256>
    assert "user default off" in acl
    # Run again: new passwords, and the old URL files are replaced, not left readable.
    subprocess.run([sys.executable, "-m", "intake", "redis", "aclfile", str(out)], check=True,
                   capture_output=True, timeout=60, env=env, cwd=tmp_path)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.glob("*.url"))


def test_secrets_dir_symlinks_are_read_inside_the_dir_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes mounts each secret as a symlink into ``..data`` inside the directory: that
    works, and the value never shows in a repr or a dump (where tracebacks and ``--json`` would
    carry it). A symlink planted to a file outside the directory is not followed."""
    secrets_dir = tmp_path / "secrets"
    (secrets_dir / "..data").mkdir(parents=True)
    (secrets_dir / "..data" / "intake_token").write_text("api-token-" + "z" * 32)
    (secrets_dir / "intake_token").symlink_to(secrets_dir / "..data" / "intake_token")
    outside = tmp_path / "elsewhere"
    outside.write_text("redis://intake-broker:outside-pw@evil:6379/0")
    (secrets_dir / "intake_redis_url").symlink_to(outside)
    monkeypatch.setenv("INTAKE_SECRETS_DIR", str(secrets_dir))
    with pytest.warns(UserWarning, match="resolves outside"):
        loaded = load_settings(_env_file=None, data_dir=tmp_path / "d")
    assert loaded.token is not None and loaded.token.get_secret_value() == "api-token-" + "z" * 32
    assert loaded.redis_url is None  # the planted link was not followed
    assert "zzzz" not in repr(loaded) and "zzzz" not in str(loaded.model_dump())


def test_doctor_reports_a_world_readable_file_in_the_secrets_dir(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    secret = secrets_dir / "intake_token"
    secret.write_text("api-token-" + "q" * 32)
    secret.chmod(0o644)
    monkeypatch.setenv("INTAKE_SECRETS_DIR", str(secrets_dir))
    loaded = load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url)
    assert loaded.token is not None
    findings = run_doctor(settings=loaded)
    assert all("qqqq" not in f.message for f in findings)
    assert any(f.status == "problem" and "intake_token" in f.message for f in findings), findings
