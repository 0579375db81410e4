"""The CLI as other OS users (real accounts, run with setpriv): it promotes and approves through
the broker's socket while it cannot read a single key file, and an OS user not linked to an
approver cannot approve."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.core.models import TaskState
from intake.core.settings import Settings, load_settings
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY, open_broker
from tests.api_harness import enrol, running_broker
from tests.factories import draft

REPO = Path(__file__).resolve().parents[2]
SITE = next((REPO / ".venv" / "lib").glob("python3*/site-packages"), None)
PYTHON = "/usr/bin/python3"  # readable by every user (the venv's interpreter may live under /root)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv") or SITE is None
    or not os.path.exists(PYTHON)
    or subprocess.run([PYTHON, "-c", f"import sys; sys.exit(sys.version_info[:2] != {sys.version_info[:2]!r})"],
                      check=False).returncode,
    reason="needs root, useradd, setpriv and a system python of the same version",
)


@pytest.fixture
def users() -> Iterator[dict[str, int]]:
    """Three throwaway OS accounts, removed afterwards."""
    made: dict[str, int] = {}
    try:
        for role in ("bob", "carol", "mal"):
            name = f"it{role}{secrets.token_hex(3)}"
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
            made[name] = int(subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True).stdout)
        yield made
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)


@pytest.fixture
def shared_settings(redis_server: str, rclient) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    """A data dir other users can traverse to the socket (its parent is o+x, nothing listable)."""
    root = Path(tempfile.mkdtemp(prefix="intake-os-"))
    root.chmod(0o711)
    settings = load_settings(_env_file=None, data_dir=root / "d", redis_url=redis_server, policy=EXAMPLE_POLICY)
    generate_keys(settings)
    settings.data_dir.chmod(0o700)
    yield settings
    shutil.rmtree(root, ignore_errors=True)


def as_user(uid: int, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": f"{REPO}:{SITE}",
           "INTAKE_DATA_DIR": str(settings.data_dir)}
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", PYTHON, "-m", "intake", *args],
        env=env, cwd="/", capture_output=True, text=True, timeout=60,
    )


def test_other_os_users_use_power_only_through_the_api(shared_settings: Settings, users: dict[str, int]) -> None:
    settings = shared_settings
    (bob_user, bob_uid), (carol_user, carol_uid), (_, mal_uid) = users.items()
    codes = enrol(settings, {"bob": ("platform", (f"os:{bob_user}",)), "carol": ("security", (f"os:{carol_user}",))})
    with open_broker(settings) as broker:
        idea = broker.store.capture(draft(requester="slack:UERIN00001", text="fix rounding in fees"))[0]
    keys = list(settings.keys.values())
    with running_broker(settings):
        for key in keys:
            key.chmod(0o000)
        try:
            # Not even a key's name can be read by these users.
            peek = subprocess.run(["setpriv", f"--reuid={bob_uid}", f"--regid={bob_uid}", "--clear-groups",
                                   "cat", str(settings.keys["secrets"])], capture_output=True, text=True)
            assert peek.returncode != 0
            stranger = as_user(mal_uid, settings, "promote", idea.id, "--repo", "acme/payments",
                               "--change-type", "bugfix", "--code", "123456")
            assert stranger.returncode == 1 and "is not linked to a person" in stranger.stderr, stranger.stderr
            promoted = as_user(bob_uid, settings, "promote", idea.id, "--repo", "acme/payments",
                               "--change-type", "bugfix", "--code", codes["bob"].next(), "--json")
            assert promoted.returncode == 0, promoted.stderr
            task_id = json.loads(promoted.stdout)["task"]
            twice = as_user(bob_uid, settings, "approve", task_id, "--code", codes["bob"].next())
            assert twice.returncode == 1 and "already approved" in twice.stderr
            mal = as_user(mal_uid, settings, "approve", task_id, "--code", "123456")
            assert mal.returncode == 1 and "is not linked" in mal.stderr
            approved = as_user(carol_uid, settings, "approve", task_id, "--code", codes["carol"].next(), "--json")
            assert approved.returncode == 0, approved.stderr
            assert json.loads(approved.stdout)["status"] == "queued"
            frozen = as_user(mal_uid, settings, "freeze", "--reason", "lol")
            assert frozen.returncode == 1 and "not linked" in frozen.stderr
        finally:
            for key in keys:
                key.chmod(0o644 if key == settings.keys["public"] else 0o600)
    with open_broker(settings) as broker:
        task = broker.store.get_task(task_id)
        assert task.state is TaskState.QUEUED and [a.approver for a in task.approvals] == ["bob", "carol"]
        events = [e for e in broker.audit.export() if e["action"] == "approval.recorded"]
        assert [e["actor"] for e in events] == ["approver:bob", "approver:carol"]
