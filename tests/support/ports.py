"""Low-level helpers shared by the test servers: free loopback ports and child-process lifecycle."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"

_PR_SET_PDEATHSIG = 1

try:
    # Resolved in the parent at import time: the preexec_fn runs between fork and exec, where
    # dlopen/dlsym could deadlock if another thread held the loader lock at fork time.
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


class ProcessExitedError(RuntimeError):
    """The server process died before it became ready (e.g. its port was taken): worth a retry."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks it (bind to port 0). There is an unavoidable window between closing this
    socket and the server binding it, so callers retry start-up with a new port if the bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """Return `count` distinct free ports (all sockets held open together so no duplicates)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(
    host: str, port: int, timeout_s: float, *, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until a TCP connect to host:port succeeds.

    Raises TimeoutError after `timeout_s`, or ProcessExitedError at once if `proc` exits meanwhile
    (no point waiting for a server that has died).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessExitedError(
                f"process {proc.pid} exited with {proc.returncode} before {host}:{port} opened"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout_s:.0f}s")
        time.sleep(0.05)


def poll_until(
    check: Callable[[], bool], timeout_s: float, what: str, *, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Call `check` until it returns True.

    Raises TimeoutError after `timeout_s`, or ProcessExitedError at once if `proc` exits meanwhile.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessExitedError(
                f"process {proc.pid} exited with {proc.returncode} while waiting for {what}"
            )
        if check():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)


def die_with_parent() -> None:
    """`preexec_fn` that makes the kernel SIGKILL the child if the test runner dies.

    atexit/finalizers do not run when pytest itself is SIGKILLed (e.g. by a CI timeout), so this is
    the last line of defence against orphaned servers. Linux-only; a no-op where prctl is missing.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def stop_process(proc: subprocess.Popen[bytes], *, grace_s: float = 30.0) -> None:
    """SIGTERM `proc` and wait up to `grace_s` for it; SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill_process(proc)


def kill_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` (if still running) and reap it so no zombie is left behind."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited between poll() and kill()
            proc.kill()
    # SIGKILL cannot be ignored, so this wait is short; the bound only guards against D-state hangs.
    proc.wait(timeout=30)


def tail(path: str | os.PathLike[str], max_bytes: int = 4000) -> str:
    """Return the last `max_bytes` of a log file, for error messages."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
