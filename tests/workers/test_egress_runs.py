"""Egress and limits through a real worker: the policy's allowlist is in the approved spec, the
agent reaches the allowlisted 127.0.0.1 stub through the proxy and nothing else, the attempts
land on the task's record and in verified provenance, and disk, process and output limits stop
a run as blocked with the reason."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from intake.cli.main import cli
from intake.core.models import TaskState
from intake.core.resources import EXAMPLE_POLICY
from intake.operations.indicators.figures import broker_figures
from intake.protocol import envelope as provenance
from tests.api_harness import link_os_user, running_broker
from tests.conftest import FakeClock
from tests.workers.harness import Rig, make_rig
from tests.workers.test_egress import _Counting, listeners  # noqa: F401

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")


def policy_with(egress: list[str], limits: str = "max_output_bytes = 1048576", run_timeout: str = "30m") -> str:
    text = EXAMPLE_POLICY.read_text().replace('run_timeout = "30m"', f'run_timeout = "{run_timeout}"')
    text = text.replace("[limits]\nmax_output_bytes = 1048576\n", f"[limits]\n{limits}\n")
    marker = 'name = "acme/web"\n'
    assert marker in text and "[limits]\n" in text
    return text.replace(marker, marker + f"egress = {json.dumps(egress)}\n", 1)


@pytest.fixture
def build(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator:
    made: list[Rig] = []

    def make(egress: list[str], limits: str = "max_output_bytes = 1048576", run_timeout: str = "30m") -> Rig:
        rig = make_rig(tmp_path, redis_server, rclient, clock, policy_text=policy_with(egress, limits, run_timeout))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


FETCH = r"""
import json, sys, urllib.request, urllib.error
ok, forbidden = sys.argv[1], sys.argv[2]
out = {}
for name, url in (("ok", f"http://127.0.0.1:{ok}/ok"), ("forbidden", f"http://127.0.0.1:{forbidden}/x")):
    try:
        out[name] = urllib.request.urlopen(url, timeout=10).read().decode()
    except urllib.error.HTTPError as exc:
        out[name] = exc.code
open("docs/fetched.md", "w").write(out["ok"])
print(json.dumps(out))
sys.exit(0 if out["ok"].startswith("stub says") else 3)
"""


def test_the_agent_reaches_the_allowlisted_stub_only_and_provenance_names_the_egress(
        build, listeners: tuple[_Counting, _Counting], tmp_path: Path) -> None:  # noqa: F811
    stub, forbidden = listeners
    rig = build([f"127.0.0.1:{stub.port}"])
    task = rig.promote()
    assert task.spec.egress == (f"127.0.0.1:{stub.port}",)  # in the spec: the approval bound to it
    rig.work(rig.config(agent={"type": "command", "argv": ["python3", "-c", FETCH, str(stub.port),
                                                           str(forbidden.port)]}))
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    assert forbidden.connections == 0 and stub.paths == ["/ok"]
    sha = done.result["commit"]
    running = [e for e in rig.events("task.delivering")] or rig.events("task.awaiting_result_approval")
    assert running
    # The gated result on the record (the worker's MAC'd report) names the egress.
    gated = [e for e in rig.events("task.delivering")][0]
    assert gated["data"]["network"] == "egress" and gated["data"]["egress_refused"] == 1
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--mirror", str(rig.bare("acme/web")), str(clone)], check=True)
    note = subprocess.run(["git", "-C", str(clone), "notes", f"--ref={provenance.NOTES_REF}", "show", sha],
                          capture_output=True, check=True, text=True).stdout
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    p = statement["predicate"]
    assert p["sandbox"] == {"mode": "bwrap", "network": "egress"}
    egress = p["egress"]
    assert egress["allowlist"] == [f"127.0.0.1:{stub.port}"] and egress["allowed"] == 1 and egress["refused"] == 1
    assert [(a["host"], a["port"], a["allowed"], a["reason"]) for a in egress["attempts"]] == [
        ("127.0.0.1", stub.port, True, "allowed"), ("127.0.0.1", forbidden.port, False, "not on the allowlist")]
    assert egress["attempts"][0]["bytesDown"] > 0
    link_os_user(rig.settings)  # the CLI reads as the OS user, who must be a person
    with running_broker(rig.settings) as broker:
        result = CliRunner().invoke(cli, ["provenance", "verify", sha, "--repo", str(clone), "--json"],
                                    env=rig.env(INTAKE_URL=broker.socket_url), catch_exceptions=False)
    assert result.exit_code == 0, (result.output, result.exception)
    out = json.loads(result.stdout)
    assert out["ok"] is True, out


def test_without_an_allowlist_the_stub_is_unreachable_and_the_run_fails_with_the_record(
        build, listeners: tuple[_Counting, _Counting]) -> None:  # noqa: F811
    stub, forbidden = listeners
    rig = build([f"127.0.0.1:{forbidden.port + 1 if forbidden.port < 65535 else 1}"])
    task = rig.promote()
    rig.work(rig.config(agent={"type": "command", "argv": ["python3", "-c", FETCH, str(stub.port),
                                                           str(forbidden.port)]}))
    done = rig.task(task.id)
    assert done.state is TaskState.FAILED and done.reason == "the agent exited with status 1", done.reason
    assert stub.connections == 0 and forbidden.connections == 0
    egress = done.result["egress"]
    assert egress["allowed"] == 0 and egress["refused"] == 2
    assert [(a["port"], a["reason"]) for a in egress["attempts"]] == [
        (stub.port, "not on the allowlist"), (forbidden.port, "not on the allowlist")]
    # The leading-indicator report counts the refusals per repo (from the sealed run results).
    assert broker_figures(rig.broker, "1d").refused_egress_by_repo == {"acme/web": 2}


DISK = "import os\nwith open('docs/big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(os.urandom(1 << 20))\n"
HOME_DISK = ("import os\nfor i in range(64):\n    with open(os.path.expanduser('~/f%d' % i), 'wb') as f:\n"
             "        f.write(os.urandom(1 << 19))\n")
FORKS = ("import os, time\nkids = 0\nwhile True:\n    try:\n        if os.fork() == 0:\n            time.sleep(600)\n"
         "            os._exit(0)\n        kids += 1\n    except OSError:\n        time.sleep(0.05)\n")


# The process count is the agent user's on the host (shared with tests running beside this one):
# only the fork storm gets the small cap.
@pytest.mark.parametrize(("script", "limit", "words", "processes"), [
    (DISK, "disk", "limits.max_disk_bytes", 256),
    (HOME_DISK, "disk", "limits.max_disk_bytes", 256),
    (FORKS, "processes", "limits.max_processes (16)", 16),
    ("import sys\nsys.stdout.write('x' * 200000)\n", "output", "limits.max_output_bytes (4096)", 256),
])
def test_a_limit_stops_the_run_as_blocked_with_the_reason(build, script: str, limit: str, words: str,
                                                          processes: int) -> None:
    rig = build([], f"max_output_bytes = 4096\nmax_disk_bytes = 8388608\nmax_processes = {processes}")
    task = rig.promote()
    rig.work(rig.config(agent={"type": "command", "argv": ["python3", "-c", script]}))
    done = rig.task(task.id)
    assert done.state is TaskState.BLOCKED, (done.state, done.reason)
    assert done.reason is not None and done.reason.startswith("stopped at a limit: ") and words in done.reason
    assert done.result["limit"] == limit and done.result["pushed"] is False


def test_the_policy_refuses_an_egress_entry_without_a_port() -> None:
    import tomllib

    from intake.core.errors import PolicyError
    from intake.core.policy import parse_policy

    for bad in ("api.example.com", "api.example.com:443/v1", "http://api.example.com:443", "api example:443"):
        data = tomllib.loads(policy_with([bad]))
        with pytest.raises(PolicyError, match="egress"):
            parse_policy(data)
    assert parse_policy(tomllib.loads(policy_with(["*.example.com:443", "127.0.0.1:8080"]))).find_repo(
        "acme/web").egress == ("*.example.com:443", "127.0.0.1:8080")
