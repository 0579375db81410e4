"""`intake serve` with its port taken: one line, a non-zero exit, nothing announced or started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

INTAKE = [sys.executable, "-m", "intake"]


def test_port_in_use_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    data = tmp_path / "d"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
        env.update(INTAKE_DATA_DIR=str(data), INTAKE_PORT=str(port))
        done = subprocess.run([*INTAKE, "serve", "--dev"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""  # no "dev: …", no "serving on …"
    assert done.stderr == f"intake: port {port} on 127.0.0.1 is in use\n"
    # Nothing was set up: no data dir, so no embedded Redis and no dev worker either.
    assert not data.exists()


def test_the_announced_port_is_the_bound_one(tmp_path: Path) -> None:
    """INTAKE_PORT=0 binds a free port; the banner names the port really bound."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(tmp_path / "d"), INTAKE_PORT="0")
    serve = subprocess.Popen([*INTAKE, "serve", "--dev"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert serve.stdout is not None
        for line in serve.stdout:
            if "serving on" in line:
                port = int(line.split("http://127.0.0.1:")[1].split()[0])
                break
        else:
            raise AssertionError("serve never announced")
        assert port != 0
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        serve.terminate()
        serve.communicate(timeout=60)
