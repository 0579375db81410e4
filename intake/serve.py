"""``intake serve``: validate everything up front, then run the web app until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import click
from aiohttp import web

from intake.app import STARTUP, create_app
from intake.channels.slack.auth import SlackUnreachable, auth_test
from intake.channels.slack.transport import SlackMode, slack_mode
from intake.core.errors import ConfigError
from intake.core.logs import AccessLogger, configure_logging
from intake.core.osuser import os_user
from intake.core.policy import load_policy
from intake.core.redis_conn import EmbeddedRedis
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_secret
from intake.runtime import prepare_dev


def listen_unix(path: Path) -> socket.socket:
    """The broker's local API socket. Any local user may connect (mode 0666; the data dir
    gets o+x, never o+r): the kernel tells the broker who they are (SO_PEERCRED), and what
    they may do is decided per person. A stale socket from a dead server is replaced."""
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            probe.close()
            raise ConfigError(f"INTAKE_DATA_DIR: another broker is serving {path}")
    path.parent.chmod(path.parent.stat().st_mode | 0o001)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"INTAKE_DATA_DIR: cannot listen on {path}: {exc.strerror or exc}") from None
    os.chmod(path, 0o666)
    sock.listen(128)
    return sock


def listen_tcp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind and listen on ``host:port`` now, before anything is announced or started, so a
    port in use is one line and nothing else happens (aiohttp then serves on this socket).
    ``reuse_port`` sets SO_REUSEPORT, for an edge's several processes (:class:`EdgeProcesses`)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"INTAKE_HOST: cannot resolve {host!r} ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does: TIME_WAIT is no conflict
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use") from None
        raise ConfigError(f"INTAKE_HOST/INTAKE_PORT: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    return sock


class EdgeProcesses:
    """An edge's extra processes (``intake serve --edge --processes N``): N-1 children, each
    ``intake serve --edge`` on its own listening socket bound to the same port with SO_REUSEPORT,
    so the kernel spreads connections over N event loops (N cores) and no process hands
    requests to another. Every process verifies, captures and answers on its own, on the same
    Redis; none keeps state a request depends on (replay protection and idempotency live in
    Redis), so which one a connection lands on does not matter.

    The parent binds every socket before anything starts (a port in use is one line), passes
    each child its socket and the read end of a pipe it never writes: a child stops when that
    pipe closes, so children never outlive their parent, even one SIGKILLed. A child that exits
    on its own stops the parent too (a supervisor then restarts the whole serve), never a serve
    quietly short of processes (with a non-zero exit when the child crashed, zero when it was
    stopped cleanly). Only the parent serves the local API socket and /metrics.

    SO_REUSEPORT lets any process of the same user join the port and take a share of its
    connections; that user can read the keys anyway, so no boundary moves.
    """

    def __init__(self, socks: list[socket.socket], argv: list[str]) -> None:
        self._socks = socks
        self._argv = argv
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._alive_r, self._alive_w = os.pipe()
        self.failed: str | None = None

    def start(self) -> None:
        """Start one child per socket, then close this process's copies of their sockets (a
        socket nobody accepts on would hold the connections the kernel gives it)."""
        for sock in self._socks:
            fds = (sock.fileno(), self._alive_r)
            proc = subprocess.Popen([*self._argv, "--listen-fd", str(fds[0]), "--parent-fd", str(fds[1])],
                                    pass_fds=fds, stdin=subprocess.DEVNULL)
            self._procs.append(proc)
            threading.Thread(target=self._watch, args=(proc,), name=f"edge-{proc.pid}", daemon=True).start()
        for sock in self._socks:
            sock.close()
        self._close_read_end()

    def _close_read_end(self) -> None:
        if self._alive_r >= 0:
            os.close(self._alive_r)
            self._alive_r = -1

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._stopping:
            return
        if code == 0:
            # A clean stop: the child was signalled, usually with this process (Ctrl-C reaches
            # the whole process group; a service manager signals every process at once).
            click.echo(f"intake: edge process {proc.pid} stopped; stopping this serve", err=True)
        else:  # a crash: the serve stops with this line and a non-zero exit
            self.failed = f"edge process {proc.pid} exited ({code}); stopping this serve"
        os.kill(os.getpid(), signal.SIGTERM)  # run_app stops as on Ctrl-C

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every child (SIGTERM, then SIGKILL after ``timeout``) and wait for them."""
        self._stopping = True
        self._close_read_end()
        os.close(self._alive_w)
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop_with_parent(parent_fd: int) -> None:
    """In an edge's child process: SIGTERM this process once the parent is gone (the pipe it
    holds the write end of reads EOF). Nothing is ever written on the pipe."""

    def wait() -> None:
        while os.read(parent_fd, 1):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="parent-watch", daemon=True).start()


DEV_REQUESTER = "erin"


def prepare_dev_people(settings: Settings) -> list[str]:
    """Dev mode's people, so the README walk-through works for the one OS user running it:

    - that OS user is linked to the policy's first admin (created) while no admin exists;
    - a requester ``erin`` with an API token in ``$INTAKE_DATA_DIR/dev-erin.token`` (0600), so
      the walk-through can file an idea as someone other than the approver (nobody approves
      work they filed themselves, so one person cannot play both parts).

    Returns one line per thing it did, for the start-up banner."""
    from intake.api.callers import ApiTokens
    from intake.core.errors import InvalidInput
    from intake.people.registry import People, bootstrap_admin
    from intake.runtime import open_broker

    done = []
    with open_broker(settings) as broker:
        people, admins = People(broker.store), broker.policy.admins.members
        user = os_user()
        if admins:
            with contextlib.suppress(InvalidInput):  # an admin exists already: nothing to do
                bootstrap_admin(people, admins, admins[0], name=admins[0].title(), os_user=user, actor="system:dev")
                done.append(f"linked os:{user} to {admins[0]} (admin)")
        token_file = settings.data_dir / f"dev-{DEV_REQUESTER}.token"
        if people.find(DEV_REQUESTER) is None:
            people.upsert(DEV_REQUESTER, name=DEV_REQUESTER.title(), actor="system:dev")
            _, token = ApiTokens(broker.store, people).create(DEV_REQUESTER, actor="system:dev", scope="ideas")
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
            done.append(f"requester {DEV_REQUESTER}: API token in {token_file}")
        broker.audit.seal_pending()
    return done


def slack_status(settings: Settings, mode: SlackMode) -> str:
    """The start-up line about Slack: "Slack on" only once Slack has accepted the bot token
    (a refused token raises ConfigError, so serve stops with one line)."""
    if not mode.on or settings.slack_bot_token is None:
        return mode.describe()
    try:
        bot = auth_test(settings)
    except SlackUnreachable as exc:
        return f"{mode.describe()} (token not verified: {exc}; cards wait until Slack answers)"
    return f"{mode.describe()} as {bot.user_id} in {bot.team or bot.team_id}"


def event_loop() -> asyncio.AbstractEventLoop:
    """The loop `intake serve` runs on: uvloop where it is installed (a dependency on Linux;
    bench/slack_capture.py measures what it buys), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(settings: Settings, *, dev: bool, listen_fd: int | None = None, parent_fd: int | None = None) -> None:
    """Start the broker in the foreground. Fails fast, with one line, on a bad setting.

    ``listen_fd``/``parent_fd`` are given only to an edge's extra processes, by
    :class:`EdgeProcesses`: the socket to serve on and the pipe whose close means "stop"."""
    configure_logging(settings)
    if listen_fd is not None:  # one of an edge's extra processes: its socket is bound already
        if parent_fd is None:
            raise ConfigError("--listen-fd needs --parent-fd")
        stop_with_parent(parent_fd)
        tcp = socket.socket(fileno=listen_fd)
        try:
            _run_child(settings.model_copy(update={"metrics_port": None, "edge_processes": 1}), tcp)
        finally:
            tcp.close()
        return
    # Everything that can fail on this host is checked before a line is printed or anything
    # starts: the port first (then dev set-up, policy, keys, the API socket).
    several = settings.edge_processes > 1
    tcp = listen_tcp(settings.host, settings.port, reuse_port=several)
    extra: list[socket.socket] = []
    try:
        extra = [listen_tcp(settings.host, tcp.getsockname()[1], reuse_port=True)
                 for _ in range(settings.edge_processes - 1)]
        _run(settings, tcp, extra, dev=dev)
    finally:
        tcp.close()
        for sock in extra:
            sock.close()


def _switch_interval() -> None:
    # Redis calls run in worker threads next to a busy event loop; with the default 5 ms GIL
    # switch interval each blocked call can wait that long to resume (a "convoy"), which
    # capped capture throughput. 1 ms keeps them moving (bench/slack_capture.py measures it).
    sys.setswitchinterval(0.001)


def _check_keys(settings: Settings) -> None:
    for purpose in ("audit", "secrets"):
        load_secret(settings, purpose)


def _release_embedded(settings: Settings) -> None:
    # A second Ctrl-C can cut the app's own cleanup short; never leave the embedded Redis
    # running with nobody using it. Signals are ignored for this last step.
    if settings.redis_url is None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        EmbeddedRedis(settings.data_dir).stop_if_unused()


def _run_child(settings: Settings, tcp: socket.socket) -> None:
    """An edge's extra process: the same app on its own socket; no banner, no local API socket,
    no /metrics listener (the parent has those), no second Slack token check."""
    _switch_interval()
    load_policy(settings.policy_path)
    _check_keys(settings)
    try:
        app = create_app(settings, wait_ready=False)
        web.run_app(app, sock=[tcp], print=None, access_log_class=AccessLogger, loop=event_loop())
        if app[STARTUP].error is not None:
            raise app[STARTUP].error
    finally:
        _release_embedded(settings)


def _run(settings: Settings, tcp: socket.socket, extra: list[socket.socket], *, dev: bool) -> None:
    _switch_interval()
    if dev:
        for line in prepare_dev(settings):
            click.echo(f"dev: {line}")
    policy = load_policy(settings.policy_path)
    if dev:
        for line in prepare_dev_people(settings):
            click.echo(f"dev: {line}")
    _check_keys(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the API socket lives there
    slack = slack_status(settings, slack_mode(settings))  # a token Slack refuses stops serve here
    sock_path = settings.data_dir / "intake.sock"
    sock = listen_unix(sock_path)
    children = EdgeProcesses(extra, [sys.executable, "-m", "intake", "serve", "--edge"]) if extra else None
    try:
        app = create_app(settings, dev=dev, wait_ready=False)
        if children is not None:
            async def start_children(app: web.Application) -> None:
                children.start()  # once run_app handles SIGTERM: a child's exit stops this serve

            app.on_startup.append(start_children)
        click.echo(f"intake: {slack}")
        if settings.edge:
            click.echo("intake: edge: answering requests only; full serves on this Redis seal, dispatch and post cards")
        if children is not None:
            click.echo(f"intake: edge: {settings.edge_processes} processes on this port (SO_REUSEPORT)")
        redis_where = "configured INTAKE_REDIS_URL" if settings.redis_url else f"embedded, {settings.data_dir}/redis"
        click.echo(f"intake: policy {settings.policy_path} ({policy.version_hash[:12]}); redis {redis_where}")
        port = tcp.getsockname()[1]
        if settings.metrics_port is not None:
            click.echo(f"intake: /metrics on its own listener, http://{settings.metrics_host}:{settings.metrics_port}"
                       + (" (a free port, logged when bound)" if settings.metrics_port == 0 else ""))
        if dev:  # the console accepts the loopback origin the browser uses (both names)
            click.echo(f"intake: console at http://127.0.0.1:{port}/console (or http://localhost:{port}/console; "
                       f"passkeys only at {settings.console_origin}, their origin)")
        else:
            click.echo(f"intake: console at {settings.console_origin}/console")
        click.echo(f"intake: serving on http://{settings.host}:{port} and unix:{sock_path}  (Ctrl-C to stop)")
        web.run_app(app, sock=[tcp, sock], print=None, access_log_class=AccessLogger,
                    loop=event_loop())
        if app[STARTUP].error is not None:  # the start failed in the background: its one line
            raise app[STARTUP].error
        if children is not None and children.failed is not None:
            raise ConfigError(children.failed)
    finally:
        if children is not None:
            children.stop()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        _release_embedded(settings)
