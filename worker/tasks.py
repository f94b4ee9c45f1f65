"""The Celery task: messaging concerns only. The work itself is ``worker.pipeline``.

One task message carries a list of map messages. Each map's result is stored under its
own result id as soon as the map is done; maps whose storage failed are sent again, alone,
with backoff, until ``task_max_retries`` — then they are recorded as failed.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_init, worker_process_shutdown
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.celery_config import TASK_NAME
from producer.errors import ConfigError, MapDecodeError, StorageError, WireFormatError
from producer.keys import result_id
from producer.wire import decode_map
from worker import metrics
from worker.app import app, settings
from worker.backoff import backoff_s
from worker.budget import check_budget, task_budget_s
from worker.pipeline import Done, Failed, Pipeline, Postponed, RetryLater
from worker.result_store import ResultStore
from worker.storage import check_ca_bundle, open_storage, storage_url_parts

log = logging.getLogger("actmap.worker")


@worker_process_shutdown.connect
def _forget_process_metrics(**_: Any) -> None:
    metrics.process_exited(os.getpid())


@worker_init.connect
def _refuse_settings_that_cannot_work(**_: Any) -> None:
    """In the worker's main process as it starts: a storage URL or CA bundle that cannot work, or a
    visibility timeout too short for a message's work, stops it there."""
    try:
        storage_url_parts(settings)
        check_ca_bundle(settings)
        check_budget(settings)
    except ConfigError as exc:
        raise SystemExit(f"actmap worker: {exc}") from None


@functools.cache
def pipeline() -> Pipeline:
    # Built on first use, inside the pool process: a boto3 client must not cross a fork.
    return Pipeline(settings, open_storage(settings), settings.upload_threads)


# The broker or result backend going away mid-batch: run the whole batch again later.
# Maps already stored are written again to the same key with the same bytes, and their
# success results are never overwritten by anything but success.
_BROKER_ERRORS = (OperationalError, RedisConnectionError, RedisTimeoutError)
# What the task lets through to Celery as it is: those (autoretry_for) and Celery's own retries.
_RAISED_TO_CELERY = (*_BROKER_ERRORS, Retry, Ignore, Reject)


@app.task(
    name=TASK_NAME,
    bind=True,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=_BROKER_ERRORS,
    retry_backoff=True,
    retry_backoff_max=settings.retry_backoff_max_s,
    max_retries=settings.task_max_retries,
)
def render_maps(self: Task[Any, Any], maps: list[bytes]) -> dict[str, int]:
    results = ResultStore(self.backend)
    if not isinstance(maps, list):
        # Celery keeps no result of a task that ignores its results: recorded here, under its id.
        error = WireFormatError(
            f"task argument must be a list of map messages, received {type(maps).__name__}"
        )
        results.failed(str(self.request.id), error)
        log.error("task %s: %s", self.request.id, error)
        return {"maps": 0, "done": 0, "failed": 0, "retried": 0, "postponed": 0}
    try:
        return _render_all(self, maps, results)
    except _RAISED_TO_CELERY:
        raise
    except Exception as exc:
        # Storage that could not even be opened, a bug: Celery would acknowledge the message and
        # keep nothing (the task ignores its results), and its maps would be lost without a word.
        return _failed_unexpectedly(self, maps, results, exc)


def _render_all(self: Task[Any, Any], maps: list[bytes], results: ResultStore) -> dict[str, int]:
    done = failed = 0
    unreadable: list[str] = []
    retry: list[RetryLater] = []
    postponed: list[bytes] = []
    deadline = _deadline(self.request.eta)
    metrics.IN_FLIGHT.inc(len(maps))
    try:
        # A slow PUT does not hold back the results of the maps done meanwhile.
        for outcome in pipeline().process_batch(maps, deadline, while_waiting=results.flush):
            metrics.IN_FLIGHT.dec()
            started = time.perf_counter()
            if isinstance(outcome, Done):
                results.succeeded(outcome.result_id, outcome.result)
                metrics.MAPS.labels("done").inc()
                done += 1
            elif isinstance(outcome, Failed):
                metrics.MAPS.labels("failed").inc()
                failed += 1
                if outcome.result_id is None:
                    unreadable.append(str(outcome.error))
                else:
                    results.failed(outcome.result_id, outcome.error)
            elif isinstance(outcome, Postponed):
                postponed.append(outcome.payload)
            else:
                retry.append(outcome)
            metrics.STAGE_SECONDS.labels("result").observe(time.perf_counter() - started)
    finally:
        metrics.IN_FLIGHT.set(0)
        results.flush()  # before the message is acknowledged, when this returns
    if postponed:
        log.info("out of time for this message: %d map(s) sent on in a new one", len(postponed))
        self.apply_async(args=(postponed,), retries=self.request.retries)  # type: ignore[call-arg]
    if retry:
        _retry_or_give_up(self, retry, results)
    _record_unreadable(self, len(maps), unreadable, results)
    return {
        "maps": len(maps),
        "done": done,
        "failed": failed,
        "retried": len(retry),
        "postponed": len(postponed),
    }


def _deadline(eta: object) -> float:
    """When a message must stop starting maps (``time.monotonic()``): it is to be acknowledged before
    the broker's visibility timeout hands its maps to another worker.

    On Redis a retry is delivered when it is sent, its countdown before its ETA, and waits
    unacknowledged until it starts; past its ETA too, while every pool process is busy. Its budget allows
    for the longest countdown and counts from its ETA: the time it started late is taken off (all of
    it, when it comes that late: its maps go on at once in a new message)."""
    if isinstance(eta, str):  # as Celery's message protocol carries it: ISO 8601
        eta = datetime.fromisoformat(eta)
    if not isinstance(eta, datetime):
        return time.monotonic() + task_budget_s(settings, retried=False)
    late_s = max(0.0, time.time() - eta.timestamp())  # a naive ETA is local time, as Celery reads it
    return time.monotonic() + task_budget_s(settings, retried=True) - late_s


def _failed_unexpectedly(
    task: Task[Any, Any], maps: list[bytes], results: ResultStore, error: Exception
) -> dict[str, int]:
    """The whole message again with backoff, ``task_max_retries`` times; then each map not
    recorded yet fails with ``error`` (never over a success: Celery's path)."""
    attempt = task.request.retries
    if attempt < settings.task_max_retries:
        countdown = max(1.0, backoff_s(attempt, cap_s=settings.retry_backoff_max_s))
        log.error(
            "task %s failed unexpectedly; its %d map(s) again in %.1f s (retry %d)",
            task.request.id, len(maps), countdown, attempt + 1, exc_info=error,
        )  # fmt: skip
        raise task.retry(args=(maps,), countdown=countdown, max_retries=settings.task_max_retries)
    log.error(
        "task %s failed unexpectedly %d times; its maps fail with that error", task.request.id, attempt + 1,
        exc_info=error,
    )  # fmt: skip
    failed = 0
    unreadable: list[str] = []
    for payload in maps:
        try:
            message = decode_map(
                payload, max_pixels=settings.max_pixels, max_message_bytes=settings.max_message_bytes
            )
        except MapDecodeError as exc:
            unreadable.append(str(exc))
            continue
        rid = result_id(message.run_id, message.image_id, message.name)
        if rid not in results.recorded:
            results.failed(rid, error)
            failed += 1
    if str(task.request.id) not in results.recorded:
        _record_unreadable(task, len(maps), unreadable, results)
    results.flush()
    return {"maps": len(maps), "done": 0, "failed": failed + len(unreadable), "retried": 0, "postponed": 0}


def _record_unreadable(task: Task[Any, Any], count: int, unreadable: list[str], results: ResultStore) -> None:
    """Map messages too broken to say whose they are: one failure under the task's own id, and a log line."""
    if not unreadable:
        return
    error = WireFormatError(f"{len(unreadable)} of {count} map messages unreadable; first: {unreadable[0]}")
    results.failed(str(task.request.id), error)
    log.error("task %s: %s", task.request.id, error)


def _retry_or_give_up(task: Task[Any, Any], retry: list[RetryLater], results: ResultStore) -> None:
    attempt = task.request.retries
    if attempt < settings.task_max_retries:
        # At least a second: RabbitMQ's delayed delivery counts whole seconds and refuses 0.
        countdown = max(1.0, backoff_s(attempt, cap_s=settings.retry_backoff_max_s))
        log.info("retrying %d map(s) in %.1f s (retry %d)", len(retry), countdown, attempt + 1)
        metrics.RETRIES.inc(len(retry))  # only maps sent back: not those given up on below
        task.retry(
            args=([r.payload for r in retry],),
            countdown=countdown,
            max_retries=settings.task_max_retries,
            throw=False,
        )
        return
    for r in retry:
        error = StorageError(f"gave up after {attempt} retries: {r.error}")
        results.failed(r.result_id, error)
        log.error("map failed for good: %s", error, extra={"result_id": r.result_id})
