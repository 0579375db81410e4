"""A real ``intake worker`` process runs a sandboxed agent that dumps its environment into its
work tree: only the allowlist, the task id and this repo's agent_env secret are there; no broker
key, no Redis URL, no other repo's credential, nothing else of the worker's environment."""

from __future__ import annotations

from intake.core.models import TaskState
from tests.workers.harness import Rig, git_refs, git_show, rig  # noqa: F401

SECRETS = {
    "PAYMENTS_GIT_TOKEN": "payments-git-secret-1111",
    "PAYMENTS_AGENT_TOKEN": "payments-agent-secret-2222",
    "WEB_AGENT_TOKEN": "web-agent-secret-3333",
    "UNRELATED_SECRET": "unrelated-secret-4444",
}
# What a shell adds by itself.
SHELL_VARS = {"PWD", "OLDPWD", "SHLVL", "_"}


def test_agent_environment_holds_nothing_it_should_not(rig: Rig) -> None:
    task = rig.promote()
    config = rig.config(
        agent={"type": "command", "argv": ["/bin/sh", "-c", "env > docs/env.md"]},
        repos={
            "acme/web": {"agent_env": {"WEB_API_KEY": {"env": "WEB_AGENT_TOKEN"}}},
            "acme/payments": {
                "url": "https://git.example.invalid/acme/payments.git",
                "credential": {"env": "PAYMENTS_GIT_TOKEN"},
                "agent_env": {"PAYMENTS_API_KEY": {"env": "PAYMENTS_AGENT_TOKEN"}},
            },
        },
    )
    worker_env = rig.env(**SECRETS, LANG="C.UTF-8")
    proc = rig.spawn(config, burst=True, **SECRETS, LANG="C.UTF-8")
    assert proc.wait(timeout=60) == 0, rig.worker_log()
    rig.drain()  # the result is applied and its delivery job enqueued: a second burst delivers it
    assert rig.spawn(config, burst=True, **SECRETS, LANG="C.UTF-8").wait(timeout=60) == 0, rig.worker_log()
    rig.drain()
    assert rig.task(task.id).state is TaskState.SUCCEEDED, rig.worker_log()

    text = git_show(rig.bare("acme/web"), f"intake/{task.id}", "docs/env.md")
    seen = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert seen["INTAKE_TASK_ID"] == task.id
    assert seen["WEB_API_KEY"] == SECRETS["WEB_AGENT_TOKEN"]  # this repo's, for the agent
    assert seen["LANG"] == "C.UTF-8"
    allowed = {"LANG", "LC_ALL", "TZ", "PATH", "HOME", "TMPDIR", "INTAKE_TASK_ID", "WEB_API_KEY",
               "INTAKE_PROMPT_FILE"} | SHELL_VARS
    assert seen["HOME"] == "/home/agent" and seen["INTAKE_PROMPT_FILE"] == "/intake/prompt.md"
    assert set(seen) <= allowed, set(seen) - allowed

    forbidden = [
        SECRETS["PAYMENTS_GIT_TOKEN"], SECRETS["PAYMENTS_AGENT_TOKEN"], SECRETS["UNRELATED_SECRET"],
        worker_env["INTAKE_REDIS_URL"], worker_env["INTAKE_REDIS_URL"].removeprefix("unix://"),
        str(rig.settings.data_dir),
    ]
    for path in rig.settings.keys.values():
        forbidden += [str(path), *(line for line in path.read_text().splitlines() if "-----" not in line)]
    for value in forbidden:
        assert value not in text, f"agent saw {value[:20]}…"
    assert "REDIS" not in text and "SIGNING" not in text
    assert f"refs/heads/intake/{task.id}" in git_refs(rig.bare("acme/web"))
