"""Redis restarted mid-run: with AOF nothing is lost; without persistence, the producer sends again.

A 1,000-map run (224x224 float32 maps, 8 maps per Celery message) submitted like a GPU loop does,
50 maps at a time, while three workers of two pool processes render into a local folder. When 300
results are in, Redis (broker and result backend both) goes away — SIGKILL or a graceful stop —
and comes back on the same port 3 s later (or once a submit gave up, if that is later). The
producer keeps submitting meanwhile; a ``BrokerError`` it raises is caught and the maps submitted
again once Redis is back, as a user would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer import BrokerError, CollectTimeoutError, Producer
from producer.keys import result_id
from producer.results import MapResult
from tests.integration.conftest import Stack
from tests.reliability.test_worker_death import (
    FAST_REDELIVERY,
    MAPS,
    Outcome,
    Report,
    ResultWatch,
    cam,
    check_outcome,
    executions,
    image_id,
    make_stack,
    report_outcome,
    start_workers,
)
from tests.support.redis_server import RedisServer

CHUNK = 50  # maps per submit_many call, one call every CHUNK_EVERY_S: a GPU loop's pace
CHUNK_EVERY_S = 0.25
RESTART_AT = 300  # results in when Redis goes away
OUTAGE_S = 3.0


@dataclass
class Restart:
    """When Redis went away and came back, and how many results were in before it went."""

    down_at: float = 0.0
    up_at: float = 0.0
    results_before: int = 0


@dataclass
class RestartRun:
    results: list[MapResult]
    restart: Restart
    watch: ResultWatch
    broker_errors: int  # BrokerErrors the producer raised (each followed by a resubmit or a new flush)
    resubmitted: int  # maps submitted a second time after a BrokerError
    publisher_retries: int  # "cannot publish" warnings of the background publisher
    elapsed_s: float
    exited: list[str]  # workers that did not survive the restart


@pytest.fixture
def redis_with_aof() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:  # appendfsync always
        yield server


@pytest.fixture
def redis_in_memory() -> Iterator[RedisServer]:
    with RedisServer(appendonly=False) as server:
        yield server


def run_through_restart(
    stack: Stack,
    redis_server: RedisServer,
    scenario: str,
    crash: bool,
    collect_timeout_s: float,
    caplog: pytest.LogCaptureFixture,
) -> RestartRun:
    """Workers up; submit chunk by chunk, taking Redis down once RESTART_AT results are in and
    starting it again OUTAGE_S later; flush; collect.

    Redis is stopped and started from this thread: its process gets SIGKILL when the thread that
    started it ends (PR_SET_PDEATHSIG is per thread), so a helper thread would kill it on exit.
    """
    start_workers(stack)
    ids = [image_id(scenario, i) for i in range(MAPS)]
    producer = Producer(stack.settings, run_id=f"redis-restart-{scenario}")
    watch = ResultWatch(stack, redis_server, [result_id(producer.run_id, i) for i in ids])
    restart = Restart()

    def take_down_if_due() -> None:
        if not restart.down_at and watch.count >= RESTART_AT:
            restart.results_before = watch.count
            restart.down_at = time.monotonic()
            if crash:
                redis_server.kill()
            else:
                redis_server.stop()

    def bring_back() -> None:
        if restart.down_at and not restart.up_at:
            time.sleep(max(0.0, restart.down_at + OUTAGE_S - time.monotonic()))
            redis_server.start()
            restart.up_at = time.monotonic()

    def bring_back_if_due() -> None:
        if restart.down_at and time.monotonic() >= restart.down_at + OUTAGE_S:
            bring_back()

    broker_errors = resubmitted = 0
    caplog.set_level(logging.WARNING, logger="actmap.producer")
    started = time.monotonic()
    try:
        for first in range(0, MAPS, CHUNK):
            take_down_if_due()
            bring_back_if_due()
            chunk = [(i, cam(n)) for n, i in enumerate(ids[first : first + CHUNK], start=first)]
            try:
                producer.submit_many(chunk)
            except BrokerError:
                broker_errors += 1
                bring_back()
                producer.submit_many(chunk)  # the same maps again: same result ids, same objects
                resubmitted += len(chunk)
            time.sleep(CHUNK_EVERY_S)
        if not restart.down_at:  # the workers lagged: restart while they work through the queue
            watch.wait_for(RESTART_AT)
            take_down_if_due()
        bring_back()
        flush = getattr(producer, "flush", None)
        if flush is not None:
            try:
                flush()
            except BrokerError:
                broker_errors += 1
                flush()  # the unsent maps stay buffered: flushing again publishes them
        try:
            results = producer.collect(ids, timeout=collect_timeout_s)
        except CollectTimeoutError as exc:
            results = exc.results
        elapsed = time.monotonic() - started
        exited = [w.name for w in stack.workers if not w.alive()]
    finally:
        if restart.down_at and not restart.up_at:
            redis_server.start()  # so that the producer can close and the workers stop
        watch.close()
        producer.close()
    publisher_retries = sum("cannot publish" in r.getMessage() for r in caplog.records)
    return RestartRun(results, restart, watch, broker_errors, resubmitted, publisher_retries, elapsed, exited)


def describe(run: RestartRun, outcome: Outcome, duplicates: int) -> None:
    up = run.restart.up_at - run.restart.down_at
    last = run.watch.last_seen()
    print(
        f"\nRedis down for {up:.1f} s after {run.restart.results_before} results; "
        f"last result {None if last is None else round(last - run.restart.up_at, 1)} s after it was back"
    )
    print(
        f"producer: {run.broker_errors} BrokerError(s), {run.resubmitted} map(s) resubmitted, "
        f"{run.publisher_retries} background publisher retry warning(s)"
    )
    print(
        f"objects {outcome.objects}, success results {outcome.results}, without a result {outcome.lost} "
        f"(of which stored: {outcome.lost_with_object}), duplicate executions {duplicates}"
    )
    if run.exited:
        print(f"workers that exited: {run.exited}")


@pytest.mark.parametrize(
    ("crash", "background_publish"),
    [(True, "true"), (False, "false")],
    ids=["sigkill-background-publish", "stop-synchronous-submit"],
)
def test_workers_reconnect_after_a_redis_restart_with_aof_and_every_map_lands_once(
    redis_with_aof: RedisServer,
    tmp_path: Path,
    report: Report,
    caplog: pytest.LogCaptureFixture,
    crash: bool,
    background_publish: str,
) -> None:
    # Given Redis with AOF (appendfsync always), redelivery tuned for a test, a 2 s publish timeout
    scenario = "aof-kill" if crash else "aof-stop"
    stack = make_stack(
        redis_with_aof,
        tmp_path,
        ACTMAP_PUBLISH_TIMEOUT_S="2",
        ACTMAP_BACKGROUND_PUBLISH=background_publish,
        **FAST_REDELIVERY,
    )
    try:
        # When Redis is restarted mid-run
        run = run_through_restart(stack, redis_with_aof, scenario, crash, 45, caplog)
    finally:
        stack.stop()
    outcome = check_outcome(scenario, run.results, tmp_path / "maps")
    logs = stack.worker_logs()
    runs = executions(logs, scenario)
    duplicates = sum(runs.values()) - len(runs)
    describe(run, outcome, duplicates)
    last = run.watch.last_seen()
    report_outcome(
        report,
        f"Redis AOF {'SIGKILL' if crash else 'stop'} + start, "
        f"{'background publish' if background_publish == 'true' else 'sync submit'}",
        outcome,
        maps=MAPS,
        faults=1,
        retries=run.broker_errors + run.publisher_retries,
        recovery_s=None if last is None else last - run.restart.up_at,
        elapsed_s=run.elapsed_s,
    )
    # Then Redis really went away mid-run
    assert 0 < run.restart.results_before < MAPS
    # and every worker reconnected: none exited
    assert run.exited == [], [line for line in logs.splitlines() if "Unrecoverable error" in line][:3]
    # and every map landed once, with the bytes render_png makes, and has a success result
    assert outcome.problems == [], outcome.problems[:10]
    assert (outcome.objects, outcome.results, outcome.stray_files) == (MAPS, MAPS, [])


def test_without_persistence_a_redis_restart_forgets_maps_and_results_and_the_producer_sends_them_again(
    redis_in_memory: RedisServer,
    tmp_path: Path,
    report: Report,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Redis without AOF or RDB forgets, on restart, the queue (maps not yet taken), the
    unacknowledged maps and every result written so far. The broker cannot recover them; the
    producer, which still holds the maps it packed, sends again those without a result once the
    broker is idle (producer.redelivery). Whatever is reported success must be right throughout."""
    scenario = "in-memory"
    stack = make_stack(
        redis_in_memory,
        tmp_path,
        ACTMAP_PUBLISH_TIMEOUT_S="2",
        **FAST_REDELIVERY,
    )
    try:
        # When Redis, without persistence, is SIGKILLed mid-run and started again
        run = run_through_restart(stack, redis_in_memory, scenario, True, 15, caplog)
    finally:
        stack.stop()
    outcome = check_outcome(scenario, run.results, tmp_path / "maps")
    runs = executions(stack.worker_logs(), scenario)
    duplicates = sum(runs.values()) - len(runs)
    describe(run, outcome, duplicates)
    last = run.watch.last_seen()
    report_outcome(
        report,
        "Redis in-memory SIGKILL + start (producer resends)",
        outcome,
        maps=MAPS,
        faults=1,
        retries=run.broker_errors + run.publisher_retries,
        recovery_s=None if last is None else last - run.restart.up_at,
        elapsed_s=run.elapsed_s,
    )
    # Then Redis really went away mid-run
    assert 0 < run.restart.results_before < MAPS
    # and every success result describes its object, and every object holds the right bytes
    assert outcome.corrupted == 0, [p for p in outcome.problems if "success result" in p or "bytes" in p][:10]
    assert outcome.stray_files == []
    # and a map without a success result is only ever "still pending", never a failure
    assert outcome.failed == 0
    # and the producer sent the forgotten maps again: none is missing in the end
    assert outcome.lost == 0
