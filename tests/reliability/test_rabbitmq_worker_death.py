"""Whole-worker death on RabbitMQ: the broker gives a dead worker's messages back at once.

An 800-map run (224x224 float32 maps, 8 maps per Celery message) over RabbitMQ (its own vhost,
quorum queue), results in a private Redis, PNGs in a local folder, three workers of two pool
processes. One whole worker (main process and pool) is SIGKILLed while it holds messages; every
map must still end up once as an object with exactly the bytes ``render_png`` makes and once as a
success result. Unlike Redis (visibility timeout, sweep), RabbitMQ requeues a consumer's
unacknowledged messages as soon as its connection drops, so recovery needs no tuning.

Which maps the killed worker held is known exactly: the test records each message's task id and
maps as the producer publishes it (Celery's ``before_task_publish``), and the worker's log says
which tasks it received and never finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.signals import before_task_publish

from producer import CollectTimeoutError
from producer.keys import result_id
from producer.wire import decode_map
from tests.integration.conftest import Stack
from tests.reliability.test_worker_death import (
    BATCH_SIZE,
    Kill,
    Report,
    ResultWatch,
    busy,
    cam,
    check_outcome,
    executions,
    image_id,
    report_outcome,
    start_workers,
    task_ids,
)
from tests.support.rabbitmq import RabbitVhost, require_rabbitmq
from tests.support.redis_server import RedisServer

MAPS = 800
KILL_AT = 250  # results seen before the kill


@pytest.fixture
def rabbit_vhost() -> Iterator[RabbitVhost]:
    require_rabbitmq()
    with RabbitVhost() as vhost:
        yield vhost


@pytest.fixture
def results_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class PublishedMessages:
    """Task id -> the result ids of its maps, for every task message this process publishes."""

    def __init__(self) -> None:
        self.maps: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, body: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
        if not headers or "id" not in headers:
            return
        payloads = body[0][0]
        decoded = [decode_map(p, max_pixels=1 << 24, max_message_bytes=1 << 26) for p in payloads]
        with self._lock:
            self.maps[headers["id"]] = [result_id(m.run_id, m.image_id, m.name) for m in decoded]


def test_a_sigkilled_whole_worker_has_its_maps_redelivered_at_once_by_rabbitmq_and_every_map_lands_once(
    rabbit_vhost: RabbitVhost, results_redis: RedisServer, tmp_path: Path, report: Report
) -> None:
    # Given three workers on RabbitMQ, results in Redis (db 1, where ResultWatch looks)
    stack = Stack(
        env={
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": rabbit_vhost.url,
            "ACTMAP_RESULT_BACKEND": results_redis.url(1),
            "ACTMAP_STORAGE_URL": f"file://{tmp_path / 'maps'}",
            "ACTMAP_BATCH_SIZE": str(BATCH_SIZE),
            "ACTMAP_LOG_EACH_MAP": "true",  # executions() counts the "stored at" lines
        },
        log_dir=tmp_path,
    )
    scenario = "rmq-worker"
    ids = [image_id(scenario, i) for i in range(MAPS)]
    producer = stack.producer(run_id="rmq-worker-death")
    published = PublishedMessages()
    before_task_publish.connect(published, weak=False)
    watch = ResultWatch(stack, results_redis, [result_id(producer.run_id, i) for i in ids])
    kills: list[Kill] = []
    failure: list[BaseException] = []

    def kill_a_busy_worker() -> None:
        try:
            watch.wait_for(KILL_AT)
            deadline = time.monotonic() + 1.0
            while not any(busy(w) for w in stack.workers) and time.monotonic() < deadline:
                time.sleep(0.005)
            worker = next((w for w in stack.workers if busy(w)), stack.workers[0])
            worker.kill()  # main process and pool, SIGKILL; no replacement is started
            kill = Kill(time.monotonic(), worker.name, {})
            log = worker.log()
            held = task_ids("received", log) - task_ids("succeeded", log)
            kill.held = {task: (task, published.maps.get(task, [])) for task in held}
            kill.unfinished = {rid for task in held for rid in published.maps.get(task, [])} - set(
                watch.first_seen
            )
            kills.append(kill)
        except BaseException as exc:  # handed to the test's thread below
            failure.append(exc)

    chaos = threading.Thread(target=kill_a_busy_worker, name="chaos")
    try:
        # When the run is published, the workers start, and one of them is SIGKILLed mid-run
        producer.submit_many((i, cam(n)) for n, i in enumerate(ids))
        producer.flush()
        started = time.monotonic()
        start_workers(stack)
        chaos.start()
        try:
            results = producer.collect(ids, timeout=60)
        except CollectTimeoutError as exc:
            results = exc.results
        elapsed = time.monotonic() - started
    finally:
        if chaos.ident is not None:
            chaos.join()
        before_task_publish.disconnect(published)
        watch.close()
        producer.close()
        stack.stop()
    if failure:
        raise failure[0]
    outcome = check_outcome(scenario, results, tmp_path / "maps")
    runs = executions(stack.worker_logs(), scenario)
    duplicates = sum(runs.values()) - len(runs)
    kill = kills[0]
    recovery = kill.recovery_s(watch)
    print(
        f"\n{kill.target} killed holding {len(kill.held)} message(s), {len(kill.unfinished)} map(s) "
        f"without a result; all had their result {recovery} s after the kill"
    )
    # (check_outcome leaves out the hidden temporary file of a write a kill cut short)
    print(f"duplicate executions: {duplicates}; stray files: {outcome.stray_files}")
    report_outcome(
        report,
        "RabbitMQ: SIGKILL whole worker x1 (of 3)",
        outcome,
        maps=MAPS,
        faults=len(kills),
        retries=duplicates,
        recovery_s=recovery,
        elapsed_s=elapsed,
    )
    # Then the killed worker took unfinished maps down with it (or the scenario tested nothing)
    assert kill.unfinished, f"{kill.target} held no unfinished map when killed"
    # and every map landed once, with the bytes render_png makes, and has a success result
    assert outcome.problems == [], outcome.problems[:10]
    assert (outcome.objects, outcome.results, outcome.stray_files) == (MAPS, MAPS, [])
    assert set(runs) == set(ids)
