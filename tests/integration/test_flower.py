"""The real Flower, started as docs/operating.md says, watching a real actmap worker on Redis.

Flower is a separate process: ``celery -A worker.app flower``, with the same ACTMAP_* settings as the
workers. It learns of workers by remote control (``/api/workers?refresh=1``) and of tasks from the
worker's events; the tests read both over its HTTP API, and its Tasks page in a real headless Chromium
(Debian's, driven by Playwright).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from producer.celery_config import TASK_NAME
from tests.integration.conftest import Stack
from tests.support.ports import LOOPBACK, die_with_parent, free_port, stop_process, tail
from tests.support.workers import clean_env

ROOT = Path(__file__).resolve().parents[2]
CELERY = Path(sys.executable).with_name("celery")  # the `celery` command of this environment
CHROMIUM = Path("/usr/bin/chromium")
WAIT_S = 60.0
ARGSREPR = re.compile(r"\[<(\d+) map message\(s\)>\]")


@dataclass
class Flower:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def get(self, path: str) -> Any:
        """GET ``path`` of Flower's HTTP API, decoded from JSON."""
        with urllib.request.urlopen(self.url(path), timeout=10) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return tail(self.log_path)

    def poll(self, path: str, done: Callable[[Any], bool], what: str) -> Any:
        """GET ``path`` until ``done`` holds for the answer (up to WAIT_S); fail showing the last one."""
        deadline = time.monotonic() + WAIT_S
        answer: Any = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"Flower exited while waiting for {what}:\n{self.log()}"
            try:
                answer = self.get(path)
            except (urllib.error.URLError, OSError) as exc:  # not listening yet, or refused the API
                answer = repr(exc)
            else:
                if done(answer):
                    return answer
            time.sleep(0.1)
        pytest.fail(f"no {what} from Flower within {WAIT_S:.0f} s; {path} said:\n{answer!r}\n{self.log()}")


def worker_name(stack: Stack) -> str:
    """The worker's node name, as ``-n w1@%h`` expands it."""
    return f"{stack.workers[0].name}@{socket.gethostname()}"


@pytest.fixture(scope="module")
def flower(local_stack: Stack) -> Iterator[Flower]:
    """Flower on a free loopback port, reading the stack's broker from the same ACTMAP_* environment."""
    port = free_port()
    env = clean_env(local_stack.env)
    # Flower 2.x answers its HTTP API (/api/...) only to authenticated users unless this is set.
    # Set here, for the test only: a deployment should put Flower behind --basic-auth or OAuth.
    env["FLOWER_UNAUTHENTICATED_API"] = "true"
    log_path = local_stack.log_dir / "flower.log"
    command = [str(CELERY), "-A", "worker.app", "flower", f"--port={port}", f"--address={LOOPBACK}"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    flower = Flower(port, process, log_path)
    try:
        # Ready when the worker's heartbeats reach it: its event consumer is then subscribed, so it
        # sees every task sent from here on.
        flower.poll(
            "/api/workers?status=1",
            lambda alive: isinstance(alive, dict) and alive.get(worker_name(local_stack)) is True,
            "event from the worker",
        )
        yield flower
    finally:
        stop_process(process, grace_s=10)


def actmap_tasks(answer: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tasks of ``/api/tasks`` (uuid: task) that are actmap's."""
    return {uuid: task for uuid, task in answer.items() if task.get("name") == TASK_NAME}


def test_flower_lists_the_worker_and_shows_each_message_succeeded_with_its_short_argument_summary(
    local_stack: Stack, flower: Flower
) -> None:
    # Given Flower watching the stack, the worker it names, and the tasks it already knows of
    name = worker_name(local_stack)
    tasks_path = f"/api/tasks?taskname={TASK_NAME}"
    known = set(flower.get(tasks_path))

    # When a producer sends a few maps and collects their results
    with local_stack.producer() as producer:
        handles = [producer.submit(f"flower/{i}", np.full((32, 32), i * 40, np.uint8)) for i in range(5)]
        producer.flush()
        results = producer.collect(handles, timeout=60)
    assert all(r.ok for r in results), [r.error for r in results]

    # Then Flower's workers API, asked to inspect, lists that worker, with actmap's task and queue
    workers = flower.poll("/api/workers?refresh=1", lambda w: isinstance(w, dict) and name in w, "worker")
    assert TASK_NAME in workers[name].get("registered", []), workers[name]
    queues = [queue["name"] for queue in workers[name].get("active_queues", [])]
    assert local_stack.settings.queue in queues, workers[name]

    # And its tasks API shows every message sent as the actmap task, succeeded on that worker, its
    # arguments the producer's summary (the maps of the message, counted), never the map bytes
    def new_tasks(answer: Any) -> dict[str, dict[str, Any]]:
        return {uuid: t for uuid, t in actmap_tasks(answer).items() if uuid not in known}

    def maps_counted(task: dict[str, Any]) -> int:
        summary = ARGSREPR.fullmatch(str(task.get("args")))
        return int(summary[1]) if summary and task.get("state") == "SUCCESS" else 0

    def all_maps_succeeded(answer: Any) -> bool:
        tasks = new_tasks(answer) if isinstance(answer, dict) else {}
        return all(maps_counted(t) for t in tasks.values()) and sum(map(maps_counted, tasks.values())) == 5

    sent = new_tasks(flower.poll(tasks_path, all_maps_succeeded, "messages of 5 maps, succeeded"))
    for uuid, task in sent.items():
        assert task["worker"] == name, (uuid, task, flower.log())
        assert task["kwargs"] == "{}", (uuid, task, flower.log())
        # its result, the task's counts: a map that failed is counted there (the task still succeeds)
        counted = maps_counted(task)
        assert f"'maps': {counted}, 'done': {counted}, 'failed': 0" in str(task.get("result")), (uuid, task)


def test_flowers_tasks_page_shows_the_actmap_task_succeeded_in_a_browser(
    local_stack: Stack, flower: Flower
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing (pip install playwright)"
    )
    # Given one message sent and done while Flower watches
    with local_stack.producer() as producer:
        handle = producer.submit("flower/page", np.zeros((8, 8), np.uint8))
        assert producer.collect([handle], timeout=60)[0].ok

    # When the Tasks page is opened in a browser
    with sync_api.sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
        )
        try:
            page = context.new_page()
            page.goto(flower.url("/tasks"))
            # Then its table (filled by the page's own request) has a row of the task, succeeded
            row = page.locator("#tasks-table tbody tr", has_text=TASK_NAME).filter(has_text="SUCCESS").first
            row.wait_for(timeout=WAIT_S * 1000)
            text = row.inner_text()
            # And the task's own page, one click away, shows the producer's summary as its arguments
            row.locator("a[href*='/task/']").first.click()
            arguments = page.locator('#task-page dt:text-is("Arguments") + dd code')
            shown = arguments.inner_text(timeout=WAIT_S * 1000)
        finally:
            context.close()
    assert "SUCCESS" in text, text
    assert ARGSREPR.fullmatch(shown), shown[:200]
