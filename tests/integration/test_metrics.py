"""A real worker's Prometheus endpoint, scraped over HTTP while it works."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import numpy as np

from producer.celery_config import TASK_NAME
from tests.integration.conftest import Stack
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer


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
