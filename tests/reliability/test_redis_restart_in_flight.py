"""Redis restarted while a task is in flight: the worker survives settling its message afterwards.

One worker holds one message of a few maps whose S3 PUTs the fault proxy stalls 3 s each. Redis
(broker and results, AOF) is SIGKILLed while they are stalled and started again 1 s later. The
worker's connection drops and Celery closes the channel the message came on. Then either the task
finishes and its message is acknowledged on that closed channel, or its pool process is SIGKILLed
and Celery rejects (requeues) the message on it. kombu 5.7 can do neither (``'NoneType' object has
no attribute 'client'``); without worker.redis_restart_guard the worker exits. The message is still
unacknowledged in Redis, so the visibility sweep of the reconnected worker redelivers it, and its
maps are written (by the finished task, a second time) with the same bytes.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.keys import object_key
from tests.reliability.test_s3_faults import (
    PREFIX,
    audit,
    collect_all,
    fault_stack,
    report_audit,
    smooth_map,
    start_proxy,
    stored_objects,
)
from tests.reliability.test_worker_death import WORKER_LOST, Report, executions, in_flight, wait_until
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from worker.render import render_png

MAPS = 4  # one message (batch_size 8), one PUT thread each (upload_threads 4): all stalled at once
STALL_S = 3.0  # below the S3 read timeout (5 s): each PUT succeeds, late
OUTAGE_S = 1.0
# Redelivery tuned for a test. The settings require visibility > backoff + longest PUT + 5 s; one
# attempt of at most 1 s + 5 s (connect + read) makes the longest PUT 6 s.
SETTINGS = {
    "batch_size": "8",
    "upload_threads": str(MAPS),
    "storage_max_attempts": "1",
    "s3_connect_timeout_s": "1",
    "s3_read_timeout_s": "5",
    "retry_backoff_max_s": "1",
    "visibility_timeout_s": "14",
    "restore_interval_s": "1",
    "log_each_map": "true",  # executions() counts the "stored at" lines
}
SCENARIO = "in-flight"
NOT_ACKNOWLEDGED = "could not be acknowledged: its connection closed when Redis went away"


@pytest.fixture
def redis_with_aof() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:  # appendfsync always: unacked survives SIGKILL
        yield server


def unacknowledged(redis_server: RedisServer) -> dict[str, tuple[str, list[str]]]:
    broker = redis_server.client(0)
    try:
        return in_flight(broker)
    finally:
        broker.close()


def test_a_task_finishing_after_redis_restarted_is_acknowledged_later_by_redelivery_and_the_worker_lives(
    redis_with_aof: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report: Report
) -> None:
    # Given one worker whose first MAPS PUTs are each stalled STALL_S by the proxy (later ones not)
    proxy = start_proxy(s3_server, fault_rate=1.0, kinds=["stall"], stall_s=STALL_S, max_stalls=MAPS)
    with fault_stack(redis_with_aof, s3_server, tmp_path, 0, proxy, **SETTINGS) as fs:
        worker = fs.stack.workers[0]
        rng = np.random.default_rng(3)
        maps = {f"{SCENARIO}/{i}": smooth_map(rng) for i in range(MAPS)}
        expected = {image_id: render_png(cam) for image_id, cam in maps.items()}
        started = time.monotonic()
        with fs.stack.producer() as producer:
            producer.submit_many(maps.items())
            run_id = producer.run_id
        # and the message in flight: taken by the worker, unacknowledged, its PUTs stalled
        assert wait_until(lambda: proxy.stats().faults["stall"] >= 1, timeout_s=30)
        held = unacknowledged(redis_with_aof)
        assert len(held) == 1, held

        # When Redis is SIGKILLed and started again OUTAGE_S later (from this thread: see
        # test_redis_restart.run_through_restart), before the stalled PUTs are answered
        redis_with_aof.kill()
        time.sleep(OUTAGE_S)
        redis_with_aof.start()
        # and every map's result is collected, and the redelivered message acknowledged (or the
        # worker gone), within the visibility timeout and then some
        results = collect_all(fs.stack, run_id, list(maps), timeout=30)
        wait_until(lambda: not worker.alive() or not unacknowledged(redis_with_aof), timeout_s=30)
        left = unacknowledged(redis_with_aof)
        elapsed = time.monotonic() - started
        alive = worker.alive()
        objects = stored_objects(s3_server, fs.bucket)
    log = worker.log()
    figures = audit(results, expected, objects, fs.bucket)
    runs = executions(log, SCENARIO)
    report_audit(
        report,
        "Redis SIGKILL + start, task in flight",
        figures,
        objects=len(objects),
        maps=MAPS,
        faults=1,
        retries=sum(runs.values()) - MAPS,
        elapsed_s=elapsed,
    )
    print(f"\ntimes stored per map: {dict(runs)}; {elapsed:.1f} s; left unacknowledged: {left}")

    # Then the worker survived acknowledging on the closed channel
    assert alive, [line for line in log.splitlines() if "Unrecoverable error" in line][:3]
    assert "Unrecoverable error" not in log
    # and it went through the guard: the acknowledgement was left to the visibility sweep
    assert log.count(NOT_ACKNOWLEDGED) == 1, [line for line in log.splitlines() if "WARNING" in line]
    # and the sweep redelivered the message, which was then acknowledged: nothing left in unacked
    assert left == {}
    # and every map was stored twice (the task, then its redelivery), with the bytes render_png
    # makes, and has one success result describing it
    assert dict(runs) == dict.fromkeys(maps, 2)
    assert str(figures) == f"ok={MAPS} failed=0 lost=0 corrupted=0 stray=0"  # else: what was wrong
    assert sorted(objects) == sorted(object_key(PREFIX, image_id) for image_id in maps)


NOT_HANDED_BACK = "could not hand 1 unacknowledged message(s) back to Redis now"
NOT_REJECTED = "could not be rejected: its connection closed when Redis went away"


def test_a_pool_process_killed_while_redis_is_down_has_its_message_redelivered_and_the_worker_lives(
    redis_with_aof: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report: Report
) -> None:
    """Celery rejects (requeues) a message whose pool process died: on the closed channel, that
    fails like the acknowledgement above (``'NoneType' object has no attribute 'client'``)."""
    # Given one worker whose first MAPS PUTs are each stalled STALL_S by the proxy (later ones not)
    proxy = start_proxy(s3_server, fault_rate=1.0, kinds=["stall"], stall_s=STALL_S, max_stalls=MAPS)
    with fault_stack(redis_with_aof, s3_server, tmp_path, 0, proxy, **SETTINGS) as fs:
        worker = fs.stack.workers[0]
        rng = np.random.default_rng(4)
        maps = {f"{SCENARIO}/{i}": smooth_map(rng) for i in range(MAPS)}
        expected = {image_id: render_png(cam) for image_id, cam in maps.items()}
        started = time.monotonic()
        with fs.stack.producer() as producer:
            producer.submit_many(maps.items())
            run_id = producer.run_id
        # and the message in flight: taken by the worker, unacknowledged, its PUTs stalled
        assert wait_until(lambda: proxy.stats().faults["stall"] >= 1, timeout_s=30)
        held = unacknowledged(redis_with_aof)
        assert len(held) == 1, held

        # When Redis is SIGKILLed, and once the worker has closed the channel the message came on,
        # its pool processes are SIGKILLed before the stalled PUTs are answered (Celery replaces
        # them), and Redis is started again OUTAGE_S after it went
        redis_with_aof.kill()
        down_at = time.monotonic()
        closed = wait_until(lambda: NOT_HANDED_BACK in worker.log(), timeout_s=STALL_S / 2)
        assert closed, worker.log()[-3000:]
        for pid in worker.pool_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        redis_with_aof.start()
        # and every map's result is collected, and the redelivered message acknowledged (or the
        # worker gone), within the visibility timeout and then some
        results = collect_all(fs.stack, run_id, list(maps), timeout=30)
        wait_until(lambda: not worker.alive() or not unacknowledged(redis_with_aof), timeout_s=30)
        left = unacknowledged(redis_with_aof)
        elapsed = time.monotonic() - started
        alive = worker.alive()
        objects = stored_objects(s3_server, fs.bucket)
    log = worker.log()
    figures = audit(results, expected, objects, fs.bucket)
    runs = executions(log, SCENARIO)
    report_audit(
        report,
        "Redis SIGKILL + start, pool process killed",
        figures,
        objects=len(objects),
        maps=MAPS,
        faults=2,
        retries=sum(runs.values()) - MAPS,
        elapsed_s=elapsed,
    )
    print(f"\ntimes stored per map: {dict(runs)}; {elapsed:.1f} s; left unacknowledged: {left}")

    # Then the worker survived rejecting on the closed channel
    assert alive, [line for line in log.splitlines() if "Unrecoverable error" in line][:3]
    assert "Unrecoverable error" not in log
    # and it went through the guard: Celery saw the pool process lost, and its requeue was left to
    # the visibility sweep
    assert log.count(WORKER_LOST) == 1
    assert log.count(NOT_REJECTED) == 1, [line for line in log.splitlines() if "WARNING" in line]
    # and the sweep redelivered the message, which was then acknowledged: nothing left in unacked
    assert left == {}
    # and every map was stored once (by the redelivery), with the bytes render_png makes, and has
    # one success result describing it
    assert dict(runs) == dict.fromkeys(maps, 1)
    assert str(figures) == f"ok={MAPS} failed=0 lost=0 corrupted=0 stray=0"  # else: what was wrong
    assert sorted(objects) == sorted(object_key(PREFIX, image_id) for image_id in maps)
