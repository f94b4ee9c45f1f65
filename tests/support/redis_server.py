"""A private, real `redis-server` for tests: loopback only, free port, own temp dir.

Optionally with a password (`requirepass`) and/or TLS only (no plaintext port): `url()` and `client()`
then carry the password and the TLS options, so the readiness check and callers authenticate and verify
the server's certificate.

Never touches the system Redis on 6379. The process is stopped by `stop()`/`kill()`/context exit,
and as a safety net by a finalizer (also run at interpreter exit) and PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import quote

import redis

from tests.support.ports import (
    LOOPBACK,
    ProcessExitedError,
    die_with_parent,
    free_port,
    kill_process,
    poll_until,
    stop_process,
    tail,
)
from tests.support.tls import TlsFiles

DEFAULT_BINARY = "/usr/bin/redis-server"


def _escape(value: str) -> str:
    """`value` as the inside of a double-quoted redis.conf string."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


class _State:
    """Mutable process state shared with the finalizer (which must not hold a reference to the server)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stdio: IO[bytes] | None = None
        self.dir: Path | None = None


def _reap(state: _State) -> None:
    """Finalizer: kill the process and remove the temp dir. Must never raise."""
    if state.proc is not None:
        # Best effort: this runs during GC or interpreter exit, where raising helps nobody.
        with contextlib.suppress(Exception):
            kill_process(state.proc)
        state.proc = None
    if state.stdio is not None:
        state.stdio.close()
        state.stdio = None
    if state.dir is not None:
        shutil.rmtree(state.dir, ignore_errors=True)
        state.dir = None


class RedisServer:
    """A redis-server child process bound to 127.0.0.1 on a free port.

    `appendonly=True` turns on AOF with `appendfsync always`, so every acknowledged write is on disk
    and survives `kill()` (SIGKILL) + `start()`. `start()` after `stop()`/`kill()` reuses the same
    port and directory, which is what restart tests need.

    `password` sets `requirepass` (through a private config file, never argv). `tls` starts it TLS-only
    (`--port 0 --tls-port PORT`, clients not asked for certificates); `port` is then the TLS port.

    `bind` lists the addresses to listen on (default 127.0.0.1 only), e.g. loopback plus the root-namespace
    ends of veth pairs made by a test; `url()` and `client()` use the first unless `url(host=...)`.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        binary: str | None = None,
        startup_timeout_s: float = 60.0,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
        tls: TlsFiles | None = None,
        bind: tuple[str, ...] = (LOOPBACK,),
    ) -> None:
        if not bind:
            raise ValueError("bind needs at least one address")
        self.appendonly = appendonly
        self.bind = bind
        self.password = password
        self.tls = tls
        self.binary = binary or shutil.which("redis-server") or DEFAULT_BINARY
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self.port: int | None = None
        self.startup_s: float | None = None  # duration of the last successful start(), for reporting
        self._closed = False
        self._state = _State()
        self._finalizer = weakref.finalize(self, _reap, self._state)

    # -- paths and URLs -------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        """Working dir (AOF lives here); created on first start and kept across restarts."""
        if self._state.dir is None:
            self._state.dir = Path(tempfile.mkdtemp(prefix="actmap-redis-"))
        return self._state.dir

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        proc = self._state.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def url(self, db: int = 0, *, ca_certs: Path | None = None, host: str | None = None) -> str:
        """`redis://127.0.0.1:PORT/DB`; `redis://:PASSWORD@…` with a password.

        With TLS: `rediss://127.0.0.1:PORT/DB?ssl_cert_reqs=required&ssl_ca_certs=CA`, the CA being this
        server's unless `ca_certs` names another (to show that a client without the right CA is refused).
        """
        if self.port is None:
            raise RuntimeError("RedisServer has not been started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        host = host or self.bind[0]
        if self.tls is None:
            return f"redis://{auth}{host}:{self.port}/{db}"
        ca = quote(str(ca_certs or self.tls.ca_cert), safe="/")
        return f"rediss://{auth}{host}:{self.port}/{db}?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def client(self, db: int = 0) -> redis.Redis:
        """A new redis-py client for this server (caller closes it)."""
        return redis.Redis.from_url(self.url(db), socket_timeout=10, socket_connect_timeout=5)

    # -- lifecycle -------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        assert self.port is not None
        args = [self.binary]
        if self.password is not None:
            # From a private config file, not argv: a command line is readable by anyone via ps.
            conf = self.dir / "auth.conf"
            conf.write_text(f'requirepass "{_escape(self.password)}"\n')
            conf.chmod(0o600)
            args.append(str(conf))
        args += [
            "--port", str(self.port),
            "--bind", *self.bind,
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            # No RDB snapshots: they fork and write dump.rdb at shutdown, which slows stop() and would
            # resurrect data on restart even when AOF is off.
            "--save", "",
        ]  # fmt: skip
        if self.appendonly:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.tls is not None:
            args[args.index("--port") + 1] = "0"  # no plaintext listener at all
            args += [
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.server_cert),
                "--tls-key-file", str(self.tls.server_key),
                "--tls-ca-cert-file", str(self.tls.ca_cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return args + list(self.extra_args)

    def start(self) -> Self:
        """Start (or restart, on the same port and dir) and wait until it answers PING."""
        if self._closed:
            raise RuntimeError("RedisServer was closed; create a new one")
        if self.running:
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        fixed_port = self.port is not None
        attempts = 1 if fixed_port else 3
        for attempt in range(1, attempts + 1):
            if not fixed_port:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except ProcessExitedError:
                # Most likely someone else grabbed the free port before redis bound it: retry on a new
                # one. On restart the port is fixed (clients hold the URL), so fail loudly instead.
                # A timeout is not retried: a hung server would only hang again.
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        t0 = time.monotonic()
        self._close_stdio()
        self._state.stdio = open(self.dir / "redis.stdout", "ab")  # noqa: SIM115 - closed in stop()/finalizer
        self._state.proc = subprocess.Popen(
            self._command(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._state.stdio,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        proc = self._state.proc
        client = self.client()
        try:

            def answers() -> bool:
                try:
                    # Compare pids, not just PING: if our bind failed, whatever else owns the port could
                    # answer before our process has exited.
                    return bool(client.info("server")["process_id"] == proc.pid)
                except redis.exceptions.BusyLoadingError:
                    return False  # still replaying a (large) AOF after restart
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    return False

            poll_until(answers, self.startup_timeout_s, f"redis-server PING on port {self.port}", proc=proc)
        except (ProcessExitedError, TimeoutError) as exc:
            kill_process(proc)
            self._state.proc = None
            # Same exception type (so start() knows whether to retry), with the server's log attached.
            raise type(exc)(
                f"redis-server failed to start: {exc}\n--- log ---\n{tail(self.log_path)}"
            ) from exc
        finally:
            client.close()
        self.startup_s = time.monotonic() - t0

    def stop(self, grace_s: float = 30.0) -> None:
        """Graceful stop (SIGTERM: redis fsyncs the AOF and exits). Keeps port and dir for start()."""
        if self._state.proc is not None:
            stop_process(self._state.proc, grace_s=grace_s)
            self._state.proc = None
        self._close_stdio()

    def kill(self) -> None:
        """SIGKILL, simulating a crash. Keeps port and dir for start()."""
        if self._state.proc is not None:
            kill_process(self._state.proc)
            self._state.proc = None
        self._close_stdio()

    def close(self) -> None:
        """Stop the server and delete its directory. The object cannot be restarted afterwards."""
        self.stop()
        self._closed = True
        self._finalizer()

    def _close_stdio(self) -> None:
        if self._state.stdio is not None:
            self._state.stdio.close()
            self._state.stdio = None

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"port={self.port}, pid={self.pid}, appendonly={self.appendonly}, dir={self._state.dir}"
        if self.password is not None:
            state += ", password=***"
        if self.tls is not None:
            state += ", tls=True"
        return f"RedisServer({state})"
