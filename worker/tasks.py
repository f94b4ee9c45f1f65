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
from typing import Any

from celery import Task
from celery.signals import worker_process_shutdown
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.celery_config import TASK_NAME
from producer.errors import StorageError, WireFormatError
from worker import metrics
from worker.app import app, settings
from worker.backoff import backoff_s
from worker.pipeline import Done, Failed, Pipeline, Postponed, Retry
from worker.result_store import ResultStore
from worker.storage import open_storage

log = logging.getLogger("actmap.worker")


@worker_process_shutdown.connect
def _forget_process_metrics(**_: Any) -> None:
    metrics.process_exited(os.getpid())


@functools.cache
def pipeline() -> Pipeline:
    # Built on first use, inside the pool process: a boto3 client must not cross a fork.
    return Pipeline(settings, open_storage(settings), settings.upload_threads)


# The broker or result backend going away mid-batch: run the whole batch again later.
# Maps already stored are written again to the same key with the same bytes, and their
# success results are never overwritten by anything but success.
_BROKER_ERRORS = (OperationalError, RedisConnectionError, RedisTimeoutError)


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
    if not isinstance(maps, list):
        raise WireFormatError(f"task argument must be a list of map messages, received {type(maps).__name__}")
    results = ResultStore(self.backend)
    done = failed = 0
    unreadable: list[str] = []
    retry: list[Retry] = []
    postponed: list[bytes] = []
    # Acknowledged before the broker's visibility timeout, or it hands these maps to another worker.
    deadline = time.monotonic() + settings.task_budget_s(retried=self.request.eta is not None)
    metrics.IN_FLIGHT.inc(len(maps))
    try:
        for outcome in pipeline().process_batch(maps, deadline):
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
                metrics.RETRIES.inc()
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
    if unreadable:
        # No map id to report under: record it under the task's own id, and say so in the log.
        error = WireFormatError(
            f"{len(unreadable)} of {len(maps)} map messages unreadable; first: {unreadable[0]}"
        )
        results.failed(str(self.request.id), error)
        log.error("task %s: %s", self.request.id, error)
    return {
        "maps": len(maps),
        "done": done,
        "failed": failed,
        "retried": len(retry),
        "postponed": len(postponed),
    }


def _retry_or_give_up(task: Task[Any, Any], retry: list[Retry], results: ResultStore) -> None:
    attempt = task.request.retries
    if attempt < settings.task_max_retries:
        # At least a second: RabbitMQ's delayed delivery counts whole seconds and refuses 0.
        countdown = max(1.0, backoff_s(attempt, cap_s=settings.retry_backoff_max_s))
        log.info("retrying %d map(s) in %.1f s (retry %d)", len(retry), countdown, attempt + 1)
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
