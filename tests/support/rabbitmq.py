"""A private vhost on the machine's RabbitMQ server (127.0.0.1:5672, guest/guest) for the tests.

The server is shared: it is never stopped or reconfigured here. Each ``RabbitVhost`` adds a fresh
vhost ``actmap-test-<random>`` with ``rabbitmqctl``, grants guest every permission on it, and deletes
it (with every queue and exchange in it) on exit. If the server cannot be reached, or ``rabbitmqctl``
cannot manage it, the test is skipped with the reason (see ``require_rabbitmq``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from types import TracebackType
from typing import Self

import pytest

HOST = os.environ.get("ACTMAP_TEST_RABBITMQ_HOST", "127.0.0.1")
PORT = int(os.environ.get("ACTMAP_TEST_RABBITMQ_PORT", "5672"))
USER = "guest"
PASSWORD = "guest"
CTL_TIMEOUT_S = 60.0


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl`` (quiet, no table headers); its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(
        ["rabbitmqctl", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=CTL_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why RabbitMQ tests cannot run here, or None if they can."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed (RabbitMQ server needed on 127.0.0.1:5672)"
    try:
        with socket.create_connection((HOST, PORT), timeout=3):
            pass
    except OSError as exc:
        return (
            f"RabbitMQ is not reachable on {HOST}:{PORT} ({exc}); start it with `rabbitmq-server -detached`"
        )
    try:
        rabbitmqctl("list_vhosts", "--no-table-headers")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"RabbitMQ is up on {HOST}:{PORT} but rabbitmqctl cannot manage it: {exc}"
    return None


def require_rabbitmq() -> None:
    """Skip the calling test (loudly, with the reason) when RabbitMQ cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"RABBITMQ UNAVAILABLE, RabbitMQ tests skipped: {reason}")


class RabbitVhost:
    """A fresh vhost for one test module; ``url`` is the broker URL pointing at it."""

    def __init__(self) -> None:
        self.name = f"actmap-test-{uuid.uuid4().hex[:12]}"
        self._created = False

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{self.name}"

    def start(self) -> Self:
        rabbitmqctl("add_vhost", self.name)
        self._created = True
        rabbitmqctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        if self._created:
            rabbitmqctl("delete_vhost", self.name)
            self._created = False

    def queues(self) -> dict[str, dict[str, str]]:
        """Queue name -> its type, messages ready and unacknowledged, as the broker reports them."""
        out = rabbitmqctl(
            "list_queues", "-p", self.name, "--no-table-headers", "name", "type", "messages_ready",
            "messages_unacknowledged",
        )  # fmt: skip
        rows = (line.split("\t") for line in out.splitlines() if line.strip())
        return {r[0]: {"type": r[1], "ready": r[2], "unacked": r[3]} for r in rows if len(r) == 4}

    def exchanges(self) -> dict[str, str]:
        """Exchange name -> type."""
        out = rabbitmqctl("list_exchanges", "-p", self.name, "--no-table-headers", "name", "type")
        rows = (line.split("\t") for line in out.splitlines() if line.strip())
        return {r[0]: r[1] for r in rows if len(r) == 2}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.delete()
