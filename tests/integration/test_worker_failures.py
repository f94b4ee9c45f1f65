"""A worker that cannot do its work says so: at start, for a storage URL that cannot work; per
map, for anything unexpected, after retries. Never a message dropped without a result."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from producer.celery_config import TASK_NAME
from tests.integration.conftest import Stack
from tests.integration.test_pipeline_s3 import raw_map
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess


def unreachable_s3_stack(module_redis: RedisServer, tmp_path: Path, **env: str) -> Stack:
    """Maps to S3 at a port nothing listens on (every PUT fails), retried once after 1 s; broker and
    results in Redis dbs 2 and 3, emptied first. ``env`` adds to or overrides that."""
    module_redis.client(2).flushdb()
    return Stack(
        env={
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": module_redis.url(2),
            "ACTMAP_RESULT_BACKEND": module_redis.url(3),
            "ACTMAP_STORAGE_URL": "s3://bucket/maps",
            "ACTMAP_S3_ENDPOINT_URL": "http://127.0.0.1:1",
            "ACTMAP_TASK_MAX_RETRIES": "1",
            "ACTMAP_RETRY_BACKOFF_MAX_S": "1",
            **env,
        },
        log_dir=tmp_path,
    )


def refusal_to_start(module_redis: RedisServer, tmp_path: Path, **env: str) -> str:
    """What a worker says as it refuses to start with ``env`` (broker and results in Redis)."""
    base = {
        "ACTMAP_HOME": str(tmp_path / "home"),
        "ACTMAP_BROKER_URL": module_redis.url(2),
        "ACTMAP_RESULT_BACKEND": module_redis.url(3),
    }
    with pytest.raises(RuntimeError, match="did not start") as raised:
        WorkerProcess({**base, **env}, tmp_path)
    return str(raised.value)


def test_a_worker_given_a_storage_url_that_cannot_work_refuses_to_start_saying_why(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    refusal = refusal_to_start(module_redis, tmp_path, ACTMAP_STORAGE_URL="gs://bucket/maps")
    assert (
        "actmap worker: storage URL 'gs://bucket/maps' has scheme 'gs'; expected s3://bucket/prefix or "
        "file:///dir"
    ) in refusal


def test_a_worker_whose_visibility_timeout_leaves_no_time_to_work_refuses_to_start_saying_why(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a retry's wait (20 s) and the longest S3 PUT (3 x (2 + 5) + 2 + 4 = 27 s) that, with
    # the 5 s margin, leave a 50 s visibility timeout less than a second: the broker could hand
    # a map to a second worker while the first still works on it
    # When a worker starts, then it stops at once, naming the settings
    refusal = refusal_to_start(
        module_redis,
        tmp_path,
        ACTMAP_STORAGE_URL="s3://bucket/maps",
        ACTMAP_S3_ENDPOINT_URL="http://127.0.0.1:1",
        ACTMAP_VISIBILITY_TIMEOUT_S="50",
    )
    assert (
        "actmap worker: ACTMAP_VISIBILITY_TIMEOUT_S (50) leaves no time to render: it must exceed "
        "ACTMAP_RETRY_BACKOFF_MAX_S (20) + the longest PUT (27 s"
    ) in refusal


def test_maps_whose_task_fails_unexpectedly_are_retried_then_each_fails_with_that_error(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a worker whose storage cannot be opened once maps come: obstore's client, and no
    # AWS credentials anywhere (an instance role not there yet, say)
    stack = unreachable_s3_stack(
        module_redis,
        tmp_path,
        ACTMAP_S3_CLIENT="obstore",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    stack.start_worker()
    try:
        # When three maps come in one message, and another message holds an unreadable one
        with stack.producer() as producer:
            pending = producer.submit_many((f"img/{i}", np.zeros((4, 4), np.float32)) for i in range(3))
            results = producer.collect(pending, timeout=60)
            task = producer._app.send_task(
                TASK_NAME, args=[[b"\xc1not msgpack", raw_map(producer.run_id, "x")]]
            )
            meta = next(producer._app.backend.get_many([task.id], timeout=60, interval=0.1))[1]
            unreadable_neighbour = producer.collect(["x"], timeout=60)[0]
    finally:
        stack.stop()
    # (the unreadable one is recorded under its task's id, as always, and its neighbour fails alone)
    assert meta["status"] == "FAILURE"
    assert "1 of 2 map messages unreadable" in str(meta["result"])
    assert unreadable_neighbour.error is not None and unreadable_neighbour.error.type == "ValueError"
    # Then the message was tried again, then each map failed with the error, which collect reads
    logs = stack.worker_logs()
    assert "failed unexpectedly; its 3 map(s) again in" in logs
    assert "failed unexpectedly 2 times; its maps fail with that error" in logs
    assert [r.ok for r in results] == [False, False, False]
    for result in results:
        assert result.error is not None
        assert result.error.type == "ValueError"
        assert "get_credentials" in result.error.message


def test_a_task_whose_argument_is_not_a_list_of_maps_is_recorded_under_its_id(local_stack: Stack) -> None:
    with local_stack.producer() as producer:
        task = producer._app.send_task(TASK_NAME, args=["not a list"])
        meta = next(producer._app.backend.get_many([task.id], timeout=60, interval=0.1))[1]
        # and the worker goes on with the next
        after = producer.submit("after-not-a-list", np.zeros((4, 4), np.uint8))
        assert producer.collect([after], timeout=60)[0].ok
    assert meta["status"] == "FAILURE"
    assert "task argument must be a list of map messages, received str" in str(meta["result"])


def test_a_retry_that_starts_late_sends_its_maps_on_at_once_rather_than_outlast_the_visibility_timeout(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a worker of one pool process whose storage refuses every connection (a PUT fails at
    # once and its maps are retried once), and a visibility timeout of 8 s: a retry, held
    # unacknowledged from when it is sent, may start maps for 1 s after its ETA (8 s less the
    # longest countdown, 1 s, the longest PUT, 1 s, and the 5 s margin)
    stack = unreachable_s3_stack(
        module_redis,
        tmp_path,
        ACTMAP_STORAGE_MAX_ATTEMPTS="1",
        ACTMAP_S3_CONNECT_TIMEOUT_S="0.5",
        ACTMAP_S3_READ_TIMEOUT_S="0.5",
        ACTMAP_VISIBILITY_TIMEOUT_S="8",
        AWS_ACCESS_KEY_ID="actmap-test",
        AWS_SECRET_ACCESS_KEY="actmap-test-secret",
    )
    worker = stack.start_worker(concurrency=1)
    try:
        with stack.producer() as producer:
            pending = producer.submit_many((f"late/{i}", np.zeros((4, 4), np.float32)) for i in range(2))
            # When the retry has reached the worker (its ETA 1 s away), the pool process is held
            # (SIGSTOP: as busy with other maps) until 4 s later
            deadline = time.monotonic() + 30
            while not re.search(
                rf"retrying 2 map\(s\).*Task {re.escape(TASK_NAME)}\[.*\] received", worker.log(), re.S
            ):
                assert time.monotonic() < deadline, worker.log()[-3000:]
                time.sleep(0.02)
            (pool,) = worker.pool_pids()
            os.kill(pool, signal.SIGSTOP)
            time.sleep(4)
            os.kill(pool, signal.SIGCONT)
            results = producer.collect(pending, timeout=60)
    finally:
        stack.stop()
    # Then the retry, ~3 s past its ETA, started no map: it sent both on in a new message at once
    logs = stack.worker_logs()
    assert "out of time for this message: 2 map(s) sent on in a new one" in logs
    # and that message tried them (the last try), and each map failed naming the cause
    assert [r.ok for r in results] == [False, False]
    for result in results:
        assert result.error is not None
        assert result.error.type == "StorageError"
        assert "gave up after 1 retries" in result.error.message
