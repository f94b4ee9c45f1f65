"""Real ``actmap worker`` (Celery worker) subprocesses for the tests."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_names = itertools.count(1)


def clean_env(settings_env: dict[str, str]) -> dict[str, str]:
    """This process's environment without any ACTMAP_* of the developer's, plus ``settings_env``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTMAP_", "AWS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings_env)
    return env


class WorkerProcess:
    """``actmap worker`` in a subprocess; waits until Celery says it is ready."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
        ready_timeout_s: float = 60.0,
        prefix: list[str] | None = None,
        global_args: tuple[str, ...] = (),
    ) -> None:
        """``prefix`` goes before the command, e.g. ``["ip", "netns", "exec", NAME]`` to run it on another
        network host (it must exec the command in place, so that the process is the worker's).
        ``global_args`` go before ``worker``: ``actmap``'s own flags (``--broker-url URL``, ...)."""
        self.name = f"w{next(_names)}"
        self.log_path = log_dir / f"{self.name}.log"
        self.command = [
            *(prefix or []),
            sys.executable,
            "-m",
            "worker.cli",
            *global_args,
            "worker",
            "--concurrency",
            str(concurrency),
            "-n",
            f"{self.name}@%h",
            "--loglevel",
            "INFO",
            *extra_args,
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, env=clean_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"worker {self.name} did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pool_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
