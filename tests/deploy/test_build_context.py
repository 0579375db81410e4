"""The image build context, listed the way Docker decides it from .dockerignore (docker-py's
``exclude_paths``, the Python SDK's implementation of the same rules), on a copy of the
repository where the Compose recipe's set-up commands have really run: no key, token, Redis
password, ACL file or data dir reaches the context; everything the Dockerfile copies does.
And git ignores every such file too."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths

from tests.conftest import REPO_ROOT

SECRET_SUFFIXES = (".key", ".pem", ".pass", ".token", ".url", ".acl")


def _patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _context(root: Path, dockerignore: str) -> set[str]:
    """Every file (not directory) Docker would send for ``docker build -f deploy/Dockerfile .``."""
    listed = exclude_paths(str(root), _patterns(dockerignore), dockerfile="deploy/Dockerfile")
    return {p for p in listed if (root / p).is_file()}


def _intake(cwd: Path, *args: str, **env: str) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    done = subprocess.run([sys.executable, "-m", "intake", *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def recipe_checkout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """The tracked files, plus what the Compose recipe (deploy/compose.yaml's header) and a dev
    run leave behind: returns the root and every planted secret file's bytes."""
    root = tmp_path_factory.mktemp("ctx")
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=60).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        src = REPO_ROOT / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    state = root / "deploy" / "state"
    _intake(root, "keys", "generate", INTAKE_DATA_DIR="deploy/state")
    _intake(root, "redis", "aclfile", "deploy/state/redis", "--worker", "worker-1", "--prefix", "intake")
    for name in ("slack_signing_secret", "slack_bot_token", "forge_token", "keys/workers/worker-1.key"):
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).write_text(secrets.token_urlsafe(32))
    shutil.copy(root / "deploy" / "policy.example.toml", state / "policy.toml")
    # A developer's leftovers: the dev data dir, an env file, a stray token beside the code.
    for rel in (".intake/keys/audit.key", ".intake/dev-erin.token", ".intake/keys/redis-broker.pass", ".env",
                "intake/.intake/keys/console.key", "workers/stray.token", "deploy/k8s/tls.key"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(secrets.token_urlsafe(32))
    planted = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
               and (p.is_relative_to(state) or ".intake" in p.parts or p.suffix in SECRET_SUFFIXES
                    or p.name == ".env")}
    assert len([p for p in planted if p.startswith("deploy/state/")]) >= 12, sorted(planted)
    return root, planted


def test_the_build_context_holds_no_secret_file_from_the_compose_recipe(
        recipe_checkout: tuple[Path, dict[str, bytes]]) -> None:
    root, planted = recipe_checkout
    context = _context(root, (root / ".dockerignore").read_text())
    leaked = sorted(set(planted) & context)
    assert not leaked, f"secret files in the Docker build context: {leaked}"
    assert not [p for p in context if p.startswith("deploy/state/") or ".intake" in Path(p).parts
                or p.endswith(SECRET_SUFFIXES)]
    # No context file holds a planted secret's bytes either (a key copied under another name).
    values = [v.strip() for rel, v in planted.items() if len(v.strip()) >= 32
              and not rel.endswith((".toml", ".pub.pem"))]  # the policy copy and public key are not secret
    for rel in context:
        data = (root / rel).read_bytes()
        assert not [v for v in values if v in data], f"{rel} holds a secret value"
    # What the Dockerfile copies is still there.
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "intake/__init__.py", "workers/sandbox.py",
                   "templates/console/base.html", "deploy/Dockerfile", "deploy/policy.example.toml"):
        assert needed in context, needed


def test_without_the_state_rule_the_recipe_state_would_leak(recipe_checkout: tuple[Path, dict[str, bytes]]) -> None:
    """The check above can fail: drop the deploy/state line and the recipe's tokens are in."""
    root, planted = recipe_checkout
    weakened = "\n".join(line for line in (root / ".dockerignore").read_text().splitlines()
                         if line.strip() != "deploy/state")
    leaked = set(planted) & _context(root, weakened)
    assert {"deploy/state/slack_bot_token", "deploy/state/forge_token",
            "deploy/state/slack_signing_secret"} <= leaked, sorted(leaked)


def test_git_ignores_every_secret_file_the_recipes_and_dev_runs_write(
        recipe_checkout: tuple[Path, dict[str, bytes]]) -> None:
    _, planted = recipe_checkout
    done = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "--no-index", "--verbose",
                           "--non-matching", "--stdin"], input="\n".join(sorted(planted)), capture_output=True,
                          text=True, timeout=60)
    not_ignored = [line.split("\t", 1)[1] for line in done.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, f"git would offer to commit: {not_ignored}"
