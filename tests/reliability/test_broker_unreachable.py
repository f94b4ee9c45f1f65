"""Redis unreachable when the GPU loop submits: a clear, bounded error, and nothing acknowledged lost."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from producer import BrokerError, Producer, Settings
from tests.integration.conftest import Stack
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer


def test_synchronous_submit_raises_a_clear_broker_error_within_the_publish_timeout(tmp_path: Path) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings(home=tmp_path, broker_url=url, background_publish=False, publish_timeout_s=2)
    with Producer(settings) as producer:
        started = time.monotonic()
        with pytest.raises(BrokerError) as caught:
            producer.submit("a", np.zeros((4, 4), np.uint8))
        waited = time.monotonic() - started
    message = str(caught.value)
    assert re.search(
        r"could not publish 1 map\(s\) to .* in \d+\.\d s \(ACTMAP_PUBLISH_TIMEOUT_S 2\)", message
    ), message
    assert "s3cret-pw" not in message  # the broker URL is shown without its password
    print(f"\nsynchronous submit gave up after {waited:.1f} s (publish_timeout_s=2)")
    # Then the wait is bounded by the publish timeout, not by kombu's retries or the 30 s socket
    # timeout. The slack (10 s) is for a loaded 2-core machine: each of kombu's ~2 attempts may
    # take up to the connect timeout (2 s) on top of its interval; a wait near 30 s means it is gone.
    assert waited < settings.publish_timeout_s + 10, waited


def test_buffered_maps_survive_an_unreachable_broker_and_are_all_delivered_when_it_returns(
    tmp_path: Path, report
) -> None:
    # Given a broker that is down when the GPU loop submits
    with RedisServer(appendonly=True) as redis_server:
        env = {
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": redis_server.url(0),
            "ACTMAP_RESULT_BACKEND": redis_server.url(1),
            "ACTMAP_STORAGE_URL": f"file://{tmp_path / 'maps'}",
            "ACTMAP_PUBLISH_TIMEOUT_S": "1",
        }
        stack = Stack(env=env, log_dir=tmp_path)
        redis_server.stop()
        rng = np.random.default_rng(0)
        maps = {f"outage/{i:03d}": rng.random((32, 32), dtype=np.float32) for i in range(50)}
        with stack.producer() as producer:
            # When maps are submitted: submit returns, the maps wait in the buffer
            started = time.monotonic()
            pending = [producer.submit(image_id, cam) for image_id, cam in maps.items()]
            # and a flush says how many are unsent rather than pretending
            with pytest.raises(BrokerError, match=r"50 map\(s\) still unsent"):
                producer.flush(timeout=2)
            assert producer.unsent == 50
            # Then when the broker is back, every map is delivered and rendered
            redis_server.start()
            outage_s = time.monotonic() - started
            stack.start_worker()
            try:
                producer.flush(timeout=60)
                results = producer.collect(pending, timeout=120)
            finally:
                stack.stop()
    assert [r.image_id for r in results] == list(maps)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    stored = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.png"))
    assert stored == [f"{image_id}.png" for image_id in maps]
    report(
        scenario="Redis down at submit (buffered)",
        maps=len(maps),
        faults=1,
        objects=len(stored),
        results=sum(r.ok for r in results),
        lost=len(maps) - sum(r.ok for r in results),
        recovery_s=time.monotonic() - started - outage_s,
        elapsed_s=time.monotonic() - started,
    )
