"""submit_many against a real Redis: a bad item in the middle of many."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from producer import Producer
from producer.errors import InvalidMapError
from tests.integration.test_result_poller import redis_settings
from tests.support.broker_queue import queued_batches
from tests.support.redis_server import RedisServer


@pytest.mark.parametrize("background_publish", [True, False])
def test_a_bad_item_raises_naming_it_and_every_map_before_it_is_submitted_none_after(
    module_redis: RedisServer, tmp_path: Path, background_publish: bool
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(module_redis, tmp_path, batch_size=4, background_publish=background_publish)
    items = [(f"img/{i:02d}", np.full((4, 4), i / 10, np.float32)) for i in range(10)]
    items[6] = ("img/06", np.full((4, 4), 2.0, np.float32))  # outside [0, 1]
    with Producer(settings) as producer:
        with pytest.raises(InvalidMapError) as raised:
            producer.submit_many(items)
        producer.flush(30)
    assert "submit_many: item 6 refused; the 6 map(s) before it are submitted, none after it" in (
        raised.value.__notes__
    )
    published = [i for batch in queued_batches(module_redis.client(0), settings.queue) for i in batch]
    assert published == [f"img/{i:02d}" for i in range(6)]
