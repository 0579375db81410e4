"""deploy/Dockerfile really built, unchanged, by a daemonless builder (Buildah: vfs storage, chroot
isolation, host network for RUN steps), and the image it makes really run: the build installs
every dependency from the hashed lock from PyPI, `intake --version` and `pip check` pass in the
image, the image holds exactly the lock's pins, `intake serve --dev` in it passes its own
HEALTHCHECK, and a lock with a wrong hash, an unhashed line or a missing dependency fails the
build.

What differs from a production build, and only that: the base images. Docker Hub is not reachable
where this runs, so the digest-pinned `python:3.11-*bookworm` bases are replaced (through the
Dockerfile's BUILD_IMAGE / RUNTIME_IMAGE build arguments, whose defaults stay the pinned digests)
by local Debian bookworm bases made with debootstrap: Debian's python3.11 with `python` linked at
/usr/local/bin as in the official images, and for the build stage python3-venv, python3-dev and
build-essential. The build base also trusts the host's CA bundle for pip (/etc/pip.conf), so
that a TLS-inspecting egress proxy does not break the PyPI downloads; hashes are checked all the
same. README "Images by digest" says what this does and does not verify.

Minutes, not seconds (debootstrap twice, then five builds at once): the default test run skips it;
.ci/run runs it as its own step with INTAKE_IMAGE_BUILD=1 (buildah and debootstrap from apt).
INTAKE_IMAGE_BUILD_CACHE=<dir> keeps the debootstrapped trees there between local runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from docker.utils.build import exclude_paths
from packaging.markers import Marker
from packaging.utils import canonicalize_name

from tests.conftest import REPO_ROOT
from tests.deploy.test_build_context import _context, recipe_checkout  # noqa: F401 (a fixture)
from tests.deploy.test_lock import lock_entries

ENABLED = os.environ.get("INTAKE_IMAGE_BUILD") == "1"
CACHE = os.environ.get("INTAKE_IMAGE_BUILD_CACHE", "")
pytestmark = pytest.mark.skipif(not ENABLED, reason="the real image build takes minutes: .ci/run runs it "
                                "with INTAKE_IMAGE_BUILD=1")

MIRROR = "http://deb.debian.org/debian"
# What each local base adds to debootstrap's minimal bookworm: the build stage's compilers and
# headers (a pin without a wheel for the platform would compile here, as on python:3.11-bookworm;
# today every pin has one), and for both a Python 3.11. Nothing the runtime stage installs itself
# (bubblewrap, git, certificates).
BASES = {"build": ["python3", "python3-venv", "python3-dev", "build-essential"], "runtime": ["python3"]}
TIMEOUT = 900


@dataclass(frozen=True)
class Buildah:
    """Buildah on a private store (vfs, under a temp dir): nothing touches the host's images."""

    root: Path

    def cmd(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root / "storage"), "--runroot", str(self.root / "run"),
                "--storage-driver", "vfs", *args]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args[:2])} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}")
        return done

    def build_cmd(self, context: Path, tag: str, dockerfile: Path | None = None) -> list[str]:
        """`docker build -f deploy/Dockerfile -t <tag> <context>`, on the local bases (never
        pulled). Docker's image format, so HEALTHCHECK is kept as Docker keeps it."""
        return self.cmd("bud", "--pull=never", "--isolation", "chroot", "--network", "host", "--format", "docker",
                        "--build-arg", "BUILD_IMAGE=localhost/intake-test-base:build",
                        "--build-arg", "RUNTIME_IMAGE=localhost/intake-test-base:runtime",
                        "-f", str(dockerfile or context / "deploy" / "Dockerfile"), "-t", tag, str(context))


def _debootstrap(trees: Path) -> dict[str, Path]:
    """The two minimal bookworm trees, made in parallel (or reused from the cache dir)."""
    procs = {}
    for kind, packages in BASES.items():
        tree = trees / f"bookworm-{kind}"
        if (tree / "usr" / "bin" / "python3").exists():
            continue
        shutil.rmtree(tree, ignore_errors=True)
        procs[kind] = subprocess.Popen(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages), "bookworm", str(tree), MIRROR],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for kind, proc in procs.items():
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"debootstrap {kind} failed:\n{out[-4000:]}"
    return {kind: trees / f"bookworm-{kind}" for kind in BASES}


def _import_base(buildah: Buildah, kind: str, tree: Path) -> None:
    """tree as localhost/intake-test-base:<kind>, shaped like the official python image where the
    Dockerfile relies on it: `python` at /usr/local/bin (the Dockerfile runs `python -m venv`),
    PATH and LANG as its ENV sets them; apt's lists and downloaded packages dropped."""
    ctr = buildah("from", "scratch").stdout.strip()
    mnt = Path(buildah("mount", ctr).stdout.strip())
    subprocess.run(["cp", "-a", f"{tree}/.", str(mnt)], check=True, timeout=TIMEOUT)
    for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
        subprocess.run(["find", str(mnt / junk), "-type", "f", "-delete"], check=True, timeout=60)
    (mnt / "usr" / "local" / "bin" / "python").symlink_to("/usr/bin/python3")
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if kind == "build" and host_bundle.is_file():
        # Trust what the host trusts (a TLS-inspecting egress proxy's CA, where there is one).
        shutil.copyfile(host_bundle, mnt / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        (mnt / "etc" / "pip.conf").write_text(f"[global]\ncert = {host_bundle}\n")
    buildah("umount", ctr)
    buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr)
    buildah("commit", "--quiet", "--rm", ctr, f"localhost/intake-test-base:{kind}")


@pytest.fixture(scope="module")
def buildah() -> Iterator[Buildah]:
    """A private Buildah store holding the two local bases."""
    for tool in ("buildah", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed (.ci/run installs it from apt)"
    root = Path(tempfile.mkdtemp(prefix="intake-image-"))
    trees = Path(CACHE) if CACHE else root / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    b = Buildah(root)
    try:
        for kind, tree in _debootstrap(trees).items():
            _import_base(b, kind, tree)
        yield b
    finally:
        b("rm", "--all", check=False)  # no container left mounted; the images go with the store
        shutil.rmtree(root, ignore_errors=True)


def _wrong_hash(text: str) -> str:
    """Every hash of the pyotp pin altered, as if the lock named other files."""
    head, sep, rest = text.partition("\npyotp==")
    entry, nl, tail = rest.partition("\n    # via")
    bumped = re.sub(r"sha256:([0-9a-f])", lambda m: "sha256:" + "0123456789abcdef"[(int(m[1], 16) + 1) % 16], entry)
    return head + sep + bumped + nl + tail


def _unhashed_line(text: str) -> str:
    return text + "six==1.17.0\n"


def _missing_dependency(text: str) -> str:
    """multidict (aiohttp needs it) and its hash lines gone."""
    return re.sub(r"\nmultidict==[^\n]*(\n    [^\n]*)*", "", text)


TAMPERED: dict[str, Callable[[str], str]] = {
    "wrong-hash": _wrong_hash, "unhashed-line": _unhashed_line, "missing-dependency": _missing_dependency}


def _context_copy(dest: Path) -> Path:
    """A copy of the build context exactly as .dockerignore decides it (docker-py's rules, as in
    test_build_context.py), to be altered by a test."""
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for rel in exclude_paths(str(REPO_ROOT), patterns, dockerfile="deploy/Dockerfile"):
        if (REPO_ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)
    return dest


@dataclass(frozen=True)
class Build:
    returncode: int
    output: str
    tagged: bool


@pytest.fixture(scope="module")
def builds(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory,
           recipe_checkout: tuple[Path, dict[str, bytes]]) -> dict[str, Build]:
    """Five builds at once (they share the bases, and mostly wait on PyPI): deploy/Dockerfile as
    "image" from the repository root, as the README's build command does, and from a copy of the
    context for each TAMPERED lock; and "context", which copies the whole build context of the
    checkout with the Compose recipe's secrets planted (test_build_context.py) into an image."""
    logs = tmp_path_factory.mktemp("logs")
    copy_all = logs / "Context.Dockerfile"
    copy_all.write_text("FROM scratch\nCOPY . /ctx/\n")
    contexts = {"image": REPO_ROOT, "context": recipe_checkout[0]}
    for name, edit in TAMPERED.items():
        context = _context_copy(tmp_path_factory.mktemp(name))
        lock = context / "requirements.lock"
        text = lock.read_text()
        assert edit(text) != text, name
        lock.write_text(edit(text))
        contexts[name] = context
    procs = {}
    for name, context in contexts.items():
        with (logs / name).open("w") as log:
            dockerfile = copy_all if name == "context" else None
            procs[name] = subprocess.Popen(buildah.build_cmd(context, f"localhost/intake:{name}", dockerfile),
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    out = {}
    for name, proc in procs.items():
        proc.wait(timeout=TIMEOUT)
        tagged = buildah("images", "--quiet", f"localhost/intake:{name}", check=False).stdout.strip() != ""
        out[name] = Build(proc.returncode, (logs / name).read_text(), tagged)
    return out


@pytest.fixture(scope="module")
def image(builds: dict[str, Build]) -> str:
    """The image built from the repository, after checking it ran the Dockerfile's lock install."""
    done = builds["image"]
    assert done.returncode == 0 and done.tagged, f"the image build failed:\n{done.output[-8000:]}"
    assert re.search(r"RUN python -m venv /opt/intake\s+&& /opt/intake/bin/pip install --no-cache-dir "
                     r"--require-hashes --no-deps -r requirements.lock", done.output), "not the Dockerfile's step"
    assert "Successfully installed intake-broker-" in done.output, "intake itself was not installed"
    assert "No broken requirements found." in done.output, "the build did not run pip check"
    return "localhost/intake:image"


@pytest.fixture(scope="module")
def run(buildah: Buildah, image: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command in one container of the image, as its USER, from its WORKDIR (chroot
    isolation allows only the host network; nothing run here uses it)."""
    ctr = buildah("from", "--quiet", "--pull=never", image).stdout.strip()
    return lambda *argv: buildah("run", "--isolation", "chroot", "--network", "host", ctr, "--", *argv, check=False)


def test_the_built_image_runs_intake_and_pip_check_passes(run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    version = run("intake", "--version")
    assert version.returncode == 0 and re.fullmatch(r"intake, version \d+\.\d+\.\d+\n", version.stdout), \
        version.stdout + version.stderr
    check = run("pip", "check")
    assert check.returncode == 0 and "No broken requirements found." in check.stdout, check.stdout + check.stderr


def test_the_image_holds_exactly_the_locks_pins(run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """Every distribution in /opt/intake is a lock pin at its version (plus pip, which the venv
    brings, and intake-broker itself); every pin whose marker holds in the image is installed."""
    probe = run("python", "-c", "import importlib.metadata as m, json; "
                "from packaging.markers import default_environment as e; "
                "print(json.dumps({'env': e(), 'dists': {d.metadata['Name']: d.version for d in m.distributions()}}))")
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    installed = {canonicalize_name(name): version for name, version in seen["dists"].items()}
    pins = lock_entries((REPO_ROOT / "requirements.lock").read_text())
    wanted = {name: str(pin.version) for name, pin in pins.items()
              if not pin.marker or Marker(pin.marker).evaluate(seen["env"])}
    extra = set(installed) - set(pins) - {"pip", "intake-broker"}
    assert not extra, f"installed but not in the lock: {sorted(extra)}"
    assert {n: installed.get(n) for n in wanted if installed.get(n) != wanted[n]} == {}, "pins not installed as locked"
    assert installed["intake-broker"] and len(wanted) > 20


def test_the_image_runs_as_uid_10001_without_compilers_and_with_the_sandbox_tools(
        buildah: Buildah, image: str, run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    assert run("id", "-u").stdout.strip() == "10001"
    tools = run("sh", "-c", "for t in bwrap git gcc cc make; do command -v $t || echo no-$t; done")
    assert tools.stdout.split() == ["/usr/bin/bwrap", "/usr/bin/git", "no-gcc", "no-cc", "no-make"], tools.stdout
    config = json.loads(buildah("inspect", "--type", "image", image).stdout)["Docker"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["intake"] and config["Cmd"] == ["serve"]
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])


def test_the_image_serves_and_its_healthcheck_passes(buildah: Buildah, image: str,
                                                    run: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    """`intake serve --dev` from the image, probed by the image's own HEALTHCHECK command. Chroot
    isolation shares the host's network, so the broker binds 127.0.0.1 on a free port (not the
    image's 0.0.0.0:8080) and the probe's port is changed to match; nothing else is."""
    probe = json.loads(buildah("inspect", "--type", "image", image).stdout)["Docker"]["config"]["Healthcheck"]["Test"]
    assert probe[0] == "CMD", probe
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [arg.replace("127.0.0.1:8080/", f"127.0.0.1:{port}/") for arg in probe[1:]]
    assert argv != probe[1:], "the HEALTHCHECK no longer probes 127.0.0.1:8080"
    # The image's INTAKE_SECRETS_DIR (/run/secrets) is mounted by the recipes; here an empty one.
    script = f"""export INTAKE_HOST=127.0.0.1 INTAKE_PORT={port} INTAKE_SECRETS_DIR=/tmp/secrets
mkdir -p /tmp/secrets
intake serve --dev > /tmp/serve.log 2>&1 &
pid=$!
i=0
while [ $i -lt 480 ] && kill -0 $pid 2>/dev/null; do
  if {shlex.join(argv)} 2>/dev/null; then healthy=1; break; fi
  i=$((i + 1)); sleep 0.25
done
kill $pid; wait $pid
cat /tmp/serve.log
[ "${{healthy:-}}" = 1 ]
"""
    done = run("sh", "-c", script)
    assert done.returncode == 0, f"the HEALTHCHECK never passed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    assert f"serving on http://127.0.0.1:{port}" in done.stdout and "GET /readyz 200" in done.stdout, done.stdout


def test_the_real_builder_sends_exactly_the_context_the_dockerignore_test_lists(
        buildah: Buildah, builds: dict[str, Build], recipe_checkout: tuple[Path, dict[str, bytes]]) -> None:
    """test_build_context.py lists the context with docker-py's reading of .dockerignore; here
    Buildah's own reading copies it (`COPY . /ctx/`) from the checkout with the recipe's secrets
    planted: the same files (less .dockerignore itself, which docker-py always lists), no secret."""
    done = builds["context"]
    assert done.returncode == 0 and done.tagged, done.output[-4000:]
    ctr = buildah("from", "--quiet", "--pull=never", "localhost/intake:context").stdout.strip()
    ctx = Path(buildah("mount", ctr).stdout.strip()) / "ctx"
    try:
        copied = {str(p.relative_to(ctx)) for p in ctx.rglob("*") if p.is_file()}
    finally:
        buildah("umount", ctr)
    root, planted = recipe_checkout
    assert not set(planted) & copied, f"secret files in the real build context: {sorted(set(planted) & copied)}"
    assert copied == _context(root, (root / ".dockerignore").read_text()) - {".dockerignore"}
    assert "deploy/Dockerfile" in copied and "requirements.lock" in copied


def _refused(build: Build) -> str:
    assert build.returncode != 0 and not build.tagged, "a build from a tampered lock made an image"
    return build.output


def test_a_wrong_hash_in_the_lock_fails_the_build(builds: dict[str, Build]) -> None:
    out = _refused(builds["wrong-hash"])
    assert "THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE" in out, out[-4000:]
    assert re.search(r"pyotp==[\d.]+ from https://files\.pythonhosted\.org/", out), out[-4000:]


def test_an_unhashed_line_in_the_lock_fails_the_build(builds: dict[str, Build]) -> None:
    out = _refused(builds["unhashed-line"])
    assert "Hashes are required in --require-hashes mode" in out and "six==1.17.0" in out, out[-4000:]


def test_a_lock_missing_a_dependency_fails_the_build_at_pip_check(builds: dict[str, Build]) -> None:
    """--no-deps installs only what the lock lists: without multidict the lock step passes, but
    the Dockerfile's `pip check` refuses aiohttp without it."""
    out = _refused(builds["missing-dependency"])
    assert "Successfully installed" in out, "the lock step itself should pass"
    assert re.search(r"aiohttp [\d.]+ requires multidict, which is not installed\.", out), out[-4000:]
