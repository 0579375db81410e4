"""The package as an operator gets it: the distribution `intake-broker` from a built wheel, installed
by that name (not editable), run from an empty directory. The wheel must carry every runtime file and no generic top-level package, and the
installed broker must take an idea to a pushed branch in dev mode, rendering Slack cards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pyotp
import pytest

from tests.conftest import REPO_ROOT
from tests.ports import free_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO_ROOT)],
                   check=True, timeout=300, capture_output=True)
    (built,) = out.glob("*.whl")
    assert built.name.startswith("intake_broker-"), built.name  # the distribution name, not PyPI's `intake`
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    # By name, from the directory holding only the built wheel: what `pip install intake-broker` does.
    subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "-q", "--no-deps", "--no-index",
                    "--find-links", str(wheel.parent), "--target", str(target), "intake-broker"],
                   check=True, timeout=300, capture_output=True)
    return target


def _source_packages() -> set[str]:
    """Every package in the checkout, by its installed name."""
    names = set()
    for top, installed in (("intake", "intake"), ("workers", "intake/workers"), ("templates", "intake/templates")):
        for init in (REPO_ROOT / top).rglob("__init__.py"):
            if ".venv" in init.parts or "__pycache__" in init.parts:
                continue
            names.add(installed + "/" + str(init.parent.relative_to(REPO_ROOT / top)).replace(".", "").strip("/"))
    return {n.rstrip("/") for n in names}


def test_the_wheel_holds_every_runtime_file_and_no_generic_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"intake"}, tops  # no `workers`, `templates` or `deploy` in site-packages
    for needed in ("intake/templates/slack/idea_card.json.j2", "intake/templates/console/base.html",
                   "intake/examples/policy.example.toml", "intake/examples/worker.example.toml",
                   "intake/console/static/console.css", "intake/console/static/console.js",
                   "intake/workers/sandbox.py"):
        assert needed in names, needed
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    missing = _source_packages() - shipped
    assert not missing, f"packages not listed in pyproject's [tool.setuptools] packages: {sorted(missing)}"
    assert not [n for n in names if n.startswith("intake/examples/") and not n.endswith((".toml", ".py"))], \
        "only the example configuration ships from deploy/"


def _env(site: Path, home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(site),
            "LANG": "C.UTF-8"}


def test_the_installed_broker_runs_the_readme_walkthrough_from_an_empty_directory(
        site: Path, tmp_path: Path, short_tmp: Path) -> None:
    run_dir = short_tmp
    env = _env(site, tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, intake, intake.workers; print(intake.__file__); "
         "d = m.distribution('intake-broker'); print(d.locate_file('')); "
         "print([e.value for e in d.entry_points if e.name == 'intake'])"],
        cwd=run_dir, env=env, capture_output=True, text=True, check=True, timeout=60)
    module, dist_root, scripts = where.stdout.splitlines()
    assert Path(module).is_relative_to(site), "the test must exercise the installed copy"
    assert Path(dist_root) == site, "the installed distribution is intake-broker"
    assert scripts == "['intake.cli.main:main']", "the command stays `intake`"
    port = free_port()
    env_serve = {**env, "INTAKE_PORT": str(port)}
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "intake", "serve", "--dev"], cwd=run_dir, env=env_serve,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if json.loads(resp.read())["status"] == "ok":
                        break
            except OSError:
                pass
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail("serve --dev did not become ready:\n" + (tmp_path / "serve.log").read_text())
            time.sleep(0.3)

        def cli(*args: str, extra: dict[str, str] | None = None) -> str:
            done = subprocess.run([sys.executable, "-m", "intake", *args], cwd=run_dir, env={**env, **(extra or {})},
                                  capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"intake {' '.join(args)}: {done.stdout}{done.stderr}"
            return done.stdout

        added = cli("approver", "add", "alice", "--name", "Alice", "--groups", "platform")
        uri = re.search(r"otpauth://\S+", added)
        assert uri, added
        totp = pyotp.parse_uri(uri.group(0))
        cli("approver", "confirm", "alice", "--code", totp.now())
        token = (run_dir / ".intake" / "dev-erin.token").read_text().strip()
        idea = json.loads(cli("idea", "Document how to run the tests", "--json",
                              extra={"INTAKE_URL": f"http://127.0.0.1:{port}", "INTAKE_TOKEN": token}))
        promoted = cli("promote", idea["id"], "--repo", "acme/web", "--change-type", "docs", "--code",
                       totp.at(time.time() + 30))  # the next step's code: later than the one just spent
        task_id = re.search(r"T-[0-9A-Za-z]+", promoted)
        assert task_id, promoted
        deadline = time.monotonic() + 120
        while (shown := json.loads(cli("show", task_id.group(0), "--json")))["state"] != "succeeded":
            if shown["state"] in ("failed", "blocked", "revoked") or time.monotonic() > deadline:
                pytest.fail(f"task ended {shown['state']}: {shown}\n" + (tmp_path / "serve.log").read_text())
            time.sleep(0.5)
        branch = shown["result"]["branch"]
        head = subprocess.run(["git", "--git-dir", str(run_dir / ".intake/repos/acme/web.git"), "rev-parse",
                               f"refs/heads/{branch}"], capture_output=True, text=True, check=True, timeout=30)
        assert head.stdout.strip() == shown["result"]["commit"]
        assert "intact" in cli("audit", "verify")
        # Slack rendering works from the installed templates (the card of this very idea).
        card = subprocess.run(
            [sys.executable, "-c",
             "import json,sys; from intake.channels.slack.render import idea_card; i=json.loads(sys.argv[1]); "
             "print(json.dumps(idea_card(idea_id=i['id'], requester_slack_id=None, requester_label='erin', "
             "source_channel='cli', provenance={}, text=i['text'], title=i['title'], state_line='captured')))",
             json.dumps(idea)],
            cwd=run_dir, env=env, capture_output=True, text=True, timeout=60)
        assert card.returncode == 0 and "Document how to run the tests" in card.stdout, card.stderr
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        log.close()
