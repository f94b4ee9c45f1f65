"""Queues per run: an urgent run goes to the workers reserved for it, not behind a backfill."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from producer import Producer, Settings
from tests.integration.conftest import Stack
from tests.support.redis_server import RedisServer


def test_each_queue_is_served_by_its_own_workers_and_one_worker_can_serve_several(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    base = {
        "ACTMAP_HOME": str(tmp_path / "home"),
        "ACTMAP_BROKER_URL": module_redis.url(6),
        "ACTMAP_RESULT_BACKEND": module_redis.url(7),
        "ACTMAP_STORAGE_URL": f"file://{tmp_path / 'maps'}",
        "ACTMAP_LOG_EACH_MAP": "true",  # the "stored" lines tell which worker stored which map
    }
    urgent = Stack(env={**base, "ACTMAP_QUEUE": "urgent"}, log_dir=tmp_path)
    backfill = Stack(env={**base, "ACTMAP_QUEUE": "backfill"}, log_dir=tmp_path)
    both = Stack(env=base, log_dir=tmp_path)
    urgent_worker = urgent.start_worker(concurrency=1)
    backfill_worker = backfill.start_worker(concurrency=1)
    try:
        with urgent.producer() as producer:
            urgent_results = producer.collect(
                [producer.submit(f"urgent/{i}", np.zeros((8, 8), np.uint8)) for i in range(5)], timeout=60
            )
        with backfill.producer() as producer:
            backfill_results = producer.collect(
                [producer.submit(f"backfill/{i}", np.zeros((8, 8), np.uint8)) for i in range(5)], timeout=60
            )
        urgent_worker.stop()
        backfill_worker.stop()
        # One worker taking both queues with Celery's own -Q flag
        both.start_worker(concurrency=1, extra_args=("-Q", "urgent,backfill"))
        collected = []
        for queue in ("urgent", "backfill"):
            settings = Settings(
                **{k.removeprefix("ACTMAP_").lower(): v for k, v in base.items()}, queue=queue
            )
            with Producer(settings) as producer:
                collected += producer.collect(
                    [producer.submit(f"{queue}/late", np.zeros((8, 8), np.uint8))], timeout=60
                )
    finally:
        for stack in (urgent, backfill, both):
            stack.stop()
    assert all(r.ok for r in urgent_results + backfill_results + collected)
    assert "'urgent/0' stored" in urgent_worker.log() and "'backfill/" not in urgent_worker.log()
    assert "'backfill/0' stored" in backfill_worker.log() and "'urgent/" not in backfill_worker.log()
    assert "'urgent/late' stored" in both.worker_logs() and "'backfill/late' stored" in both.worker_logs()
