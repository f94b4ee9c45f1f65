"""A real worker's Prometheus endpoint, scraped over HTTP while it works."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np

from producer.celery_config import TASK_NAME
from tests.integration.conftest import Stack
from tests.integration.test_worker_failures import unreachable_s3_stack
from tests.reliability.test_s3_faults import start_proxy
from tests.support.ports import free_port, poll_until
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        rf"^{re.escape(name)}(?:\{{{re.escape(selector)}\}})? (\S+)$" if selector else rf"^{name} (\S+)$"
    )
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{name}{{{selector}}} not in:\n{text[:2000]}"
    return float(match.group(1))


def test_the_metrics_endpoint_counts_maps_done_and_failed_over_all_pool_processes(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    stack = Stack(
        env={
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": module_redis.url(4),
            "ACTMAP_RESULT_BACKEND": module_redis.url(5),
            "ACTMAP_STORAGE_URL": f"file://{tmp_path / 'maps'}",
        },
        log_dir=tmp_path,
    )
    stack.start_worker(extra_args=("--metrics-port", str(port)))
    try:
        before = scrape(port)
        with stack.producer() as producer:
            good = producer.submit_many((f"m/{i}", np.zeros((16, 16), np.uint8)) for i in range(20))
            producer.flush()
            poison = producer._app.send_task(TASK_NAME, args=[[b"\xc1 not a map"]])
            results = producer.collect(good, timeout=60)
            next(producer._app.backend.get_many([poison.id], timeout=60, interval=0.1))
        after = scrape(port)
    finally:
        stack.stop()
    assert all(r.ok for r in results)
    assert sample(after, "actmap_maps_total", outcome="done") == 20
    assert sample(after, "actmap_maps_total", outcome="failed") == 1
    assert "actmap_maps_total" not in before or sample(before, "actmap_maps_total", outcome="done") == 0
    assert sample(after, "actmap_stage_seconds_count", stage="render") == 20
    assert sample(after, "actmap_stage_seconds_count", stage="store") == 20
    assert sample(after, "actmap_stage_seconds_count", stage="result") == 21  # failures are recorded too
    assert sample(after, "actmap_maps_in_flight") == 0


def test_retries_total_counts_each_map_sent_back_to_retry_after_a_failed_put(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a worker whose S3 endpoint is a port nothing listens on (every PUT fails at once), that
    # sends maps back once (ACTMAP_TASK_MAX_RETRIES=1) and then gives up on them
    port = free_port()
    stack = unreachable_s3_stack(
        module_redis,
        tmp_path,
        ACTMAP_STORAGE_MAX_ATTEMPTS="1",
        AWS_ACCESS_KEY_ID="actmap-test",
        AWS_SECRET_ACCESS_KEY="actmap-test-secret",
    )
    stack.start_worker(extra_args=("--metrics-port", str(port)))
    try:
        # When three maps are submitted and their (failed) results collected
        with stack.producer() as producer:
            pending = producer.submit_many((f"retried/{i}", np.zeros((4, 4), np.uint8)) for i in range(3))
            results = producer.collect(pending, timeout=60)
        after = scrape(port)
    finally:
        stack.stop()
    # Then each map failed for good after its one retry
    assert [r.ok for r in results] == [False, False, False]
    assert all(r.error is not None and "gave up after 1 retries" in r.error.message for r in results)
    assert stack.worker_logs().count("retrying 3 map(s) in") == 1
    # and the counter says 3 maps were sent back: once each, not once per failed PUT
    assert sample(after, "actmap_retries_total") == 3


# Each stalled PUT is held STALL_S by the proxy, below the S3 read timeout: it succeeds, late.
MAPS_HELD = 4
STALL_S = 3.0


def test_maps_in_flight_counts_the_maps_being_worked_on_and_falls_to_zero_when_they_are_done(
    module_redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    # Given a worker whose S3 PUTs go through the fault proxy, which stalls the first MAPS_HELD,
    # and which PUTs all the maps of one message at once (one upload thread each)
    proxy = start_proxy(s3_server, fault_rate=1.0, kinds=["stall"], stall_s=STALL_S, max_stalls=MAPS_HELD)
    bucket = s3_server.create_bucket()
    port = free_port()
    module_redis.client(6).flushdb()
    stack = Stack(
        env={
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": module_redis.url(6),
            "ACTMAP_RESULT_BACKEND": module_redis.url(7),
            "ACTMAP_STORAGE_URL": f"s3://{bucket}/maps",
            "ACTMAP_S3_ENDPOINT_URL": proxy.url,
            "ACTMAP_BATCH_SIZE": "8",
            "ACTMAP_UPLOAD_THREADS": str(MAPS_HELD),
            "ACTMAP_S3_READ_TIMEOUT_S": "5",
            **{k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL_S3"},  # only the proxy
        },
        log_dir=tmp_path,
    )
    try:
        stack.start_worker(extra_args=("--metrics-port", str(port)))
        with stack.producer() as producer:
            # When one message of MAPS_HELD maps is taken and all their PUTs are stalled
            pending = producer.submit_many(
                (f"held/{i}", np.zeros((8, 8), np.uint8)) for i in range(MAPS_HELD)
            )
            producer.flush()
            poll_until(lambda: proxy.stats().faults["stall"] >= MAPS_HELD, 30, "every PUT stalled")
            # (scraped while the PUTs are still held: they are answered STALL_S after they came)
            during = scrape(port)
            results = producer.collect(pending, timeout=60)
        after = scrape(port)
    finally:
        stack.stop()
        proxy.stop()
        s3_server.delete_bucket(bucket)
    # Then the gauge counted every map of the message while it was held, and none once all were done
    assert sample(during, "actmap_maps_in_flight") == MAPS_HELD
    assert all(r.ok for r in results), [r.error for r in results]
    assert sample(after, "actmap_maps_in_flight") == 0


def test_celery_tooling_works_remote_control_answers_and_task_events_flow_as_flower_reads_them(
    local_stack: Stack,
) -> None:
    with local_stack.producer() as producer:
        app = producer._app
        replies = app.control.inspect(timeout=10, limit=1).ping() or {}
        assert any(name.startswith(local_stack.workers[0].name) for name in replies), replies
        seen: list[str] = []
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(
                connection, handlers={"*": lambda event: seen.append(event["type"])}
            )
            capture = receiver.itercapture(limit=None, timeout=10, wakeup=True)
            next(capture)  # subscribed from here on, as a Flower would be
            handle = producer.submit("events/one", np.zeros((8, 8), np.uint8))
            producer.flush()
            for _ in capture:
                if "task-succeeded" in seen:
                    break
        assert producer.collect([handle], timeout=60)[0].ok
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen)
