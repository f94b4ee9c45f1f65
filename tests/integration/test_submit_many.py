"""submit_many and submit_batch against a real Redis: what reaches the broker, and what a bad map stops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producer import PendingMap, Producer
from producer.errors import InvalidImageIdError, InvalidMapError
from tests.integration.test_result_poller import redis_settings
from tests.support.broker_queue import queued_batches
from tests.support.redis_server import RedisServer


def published(server: RedisServer, queue: str) -> list[str]:
    return [image_id for batch in queued_batches(server.client(0), queue) for image_id in batch]


@pytest.mark.parametrize("bad", [0, 6, 9], ids=["first", "middle", "last"])
@pytest.mark.parametrize("background_publish", [True, False])
def test_a_bad_item_raises_naming_it_and_carrying_the_handles_of_every_map_before_it(
    module_redis: RedisServer, tmp_path: Path, background_publish: bool, bad: int
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(module_redis, tmp_path, batch_size=4, background_publish=background_publish)
    items = [(f"img/{i:02d}", np.full((4, 4), i / 10, np.float32)) for i in range(10)]
    items[bad] = (f"img/{bad:02d}", np.full((4, 4), 2.0, np.float32))  # outside [0, 1]
    with Producer(settings) as producer:
        with pytest.raises(InvalidMapError) as raised:
            producer.submit_many(items)
        producer.flush(30)
    assert f"submit_many: item {bad} refused; the {bad} map(s) before it are submitted, none after it" in (
        raised.value.__notes__
    )
    sent = published(module_redis, settings.queue)
    assert sent == [f"img/{i:02d}" for i in range(bad)]
    assert raised.value.submitted == [PendingMap(producer.run_id, image_id, None) for image_id in sent]


@pytest.mark.parametrize("background_publish", [True, False])
def test_a_batch_is_published_batch_size_maps_per_message_in_order(
    module_redis: RedisServer, tmp_path: Path, background_publish: bool
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(
        module_redis, tmp_path, batch_size=4, background_publish=background_publish, publish_linger_s=0.5
    )
    ids = [f"batch/{i:02d}" for i in range(10)]
    maps = np.random.default_rng(1).random((10, 1, 8, 6), dtype=np.float32)
    with Producer(settings) as producer:
        handles = producer.submit_batch(ids, maps, names=[None] * 9 + ["cls-1"])
        producer.flush(30)
    assert handles == [PendingMap(producer.run_id, image_id, None) for image_id in ids[:9]] + [
        PendingMap(producer.run_id, ids[9], "cls-1")
    ]
    assert queued_batches(module_redis.client(0), settings.queue) == [ids[0:4], ids[4:8], ids[8:10]]


@pytest.mark.parametrize("bad", [0, 6, 9], ids=["first", "middle", "last"])
def test_a_bad_map_in_a_batch_is_refused_naming_its_index_and_id_and_nothing_is_sent(
    module_redis: RedisServer, tmp_path: Path, bad: int
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(module_redis, tmp_path, batch_size=4)
    maps = np.full((10, 4, 4), 0.5, np.float32)
    maps[bad, 1, 2] = np.nan
    with Producer(settings) as producer:
        with pytest.raises(InvalidMapError) as raised:
            producer.submit_batch([f"img/{i:02d}" for i in range(10)], maps)
        producer.flush(30)
    assert str(raised.value) == (
        f"map {bad} of the batch (image id 'img/{bad:02d}'): activation map (float32, 16 pixels) has "
        "1 NaN and 0 infinite values; expected finite values in [0, 1]"
    )
    assert published(module_redis, settings.queue) == []


def test_a_batch_with_a_bad_image_id_or_too_few_ids_is_refused_before_anything_is_sent(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(module_redis, tmp_path)
    maps = np.zeros((3, 4, 4), np.uint8)
    with Producer(settings) as producer:
        with pytest.raises(InvalidImageIdError) as bad_id:
            producer.submit_batch(["a", "../b", "c"], maps)
        with pytest.raises(InvalidMapError) as too_few:
            producer.submit_batch(["a", "b"], maps)
        with pytest.raises(InvalidMapError) as too_many_names:
            producer.submit_batch(["a", "b", "c"], maps, names=["x", "y", "z", "w"])
        producer.flush(30)
    assert "submit_batch: map 1 refused; nothing is submitted" in bad_id.value.__notes__
    assert str(too_few.value) == "submit_batch received 2 image ids for a batch of 3 maps; expected 3"
    assert str(too_many_names.value) == "submit_batch received 4 names for a batch of 3 maps; expected 3"
    assert published(module_redis, settings.queue) == []
