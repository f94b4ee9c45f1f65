"""A producer in another language needs only a Redis client and msgpack: docs/wire-format.md, proven.

Nothing of Celery or of actmap's producer is used to send here; the messages are built from
the document alone, pushed with plain LPUSH, and the results are read back with plain MGET.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import uuid
import zlib
from pathlib import Path

import msgpack
import numpy as np
import redis
from PIL import Image

from tests.integration.conftest import Stack
from tests.support.redis_server import RedisServer
from worker.render import colorize


def png_idat(png: bytes) -> bytes:
    """The IDAT payload of a PNG written in one IDAT chunk (all of actmap's maps below 1 GiB)."""
    start = png.index(b"IDAT")
    length = int.from_bytes(png[start - 4 : start], "big")
    return png[start + 4 : start + 4 + length]


def map_message(run: str, image_id: str, intensities: np.ndarray, name: str | None = None) -> bytes:
    """The simplest valid map message: each row of the uint8 map after a filter byte 0 (None), zlib'd."""
    rows = np.hstack([np.zeros((intensities.shape[0], 1), np.uint8), intensities])
    return scanlines_message(run, image_id, zlib.compress(rows.tobytes(), 6), intensities.shape, name)


def task_envelope(maps: list[bytes], queue: str = "actmap") -> str:
    task_id = str(uuid.uuid4())
    body = msgpack.packb(
        [[maps], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}], use_bin_type=True
    )
    return json.dumps(
        {
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": "binary",
            "content-type": "application/x-msgpack",
            "headers": {
                "lang": "py",
                "task": "actmap.render_maps",
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "timelimit": [None, None],
                "argsrepr": "maps",
                "kwargsrepr": "{}",
                "ignore_result": True,
            },
            "properties": {
                "correlation_id": task_id,
                "delivery_mode": 2,
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
            },
        }
    )


def result_id(run: str, image_id: str, name: str | None) -> str:
    return "actmap-" + hashlib.sha256(json.dumps([run, image_id, name]).encode()).hexdigest()[:40]


def test_maps_sent_with_only_redis_and_msgpack_are_rendered_and_their_results_read_back(
    local_stack: Stack, module_redis: RedisServer
) -> None:
    # Given maps packed by hand: a uint8 map, and float maps quantized as the document says
    rng = np.random.default_rng(6)
    run = "foreign-run-1"
    arrays = {
        ("cpp/a", None): rng.integers(0, 256, (12, 10), dtype=np.uint8),
        ("cpp/b", "cls-3"): rng.random((9, 7), dtype=np.float32),
        ("cpp/c", None): rng.random((5, 6)),
    }
    messages = [
        map_message(
            run, image_id, np.rint(array * 255).astype(np.uint8) if array.dtype.kind == "f" else array, name
        )
        for (image_id, name), array in arrays.items()
    ]
    # When they are pushed onto the queue as the document describes
    broker = module_redis.client(0)
    broker.lpush("actmap", task_envelope(messages[:2]))
    broker.lpush("actmap", task_envelope(messages[2:]))
    # Then each map's result appears under the documented key, and its PNG is right
    keys = [f"celery-task-meta-{result_id(run, i, n)}" for i, n in arrays]
    values = wait_for_results(module_redis.client(1), keys)
    for ((image_id, name), array), raw in zip(arrays.items(), values, strict=True):
        meta = msgpack.unpackb(raw, raw=False)
        assert meta["status"] == "SUCCESS", meta
        result = meta["result"]
        assert (result["image_id"], result["name"]) == (image_id, name)
        assert result["bitmap_mask"]["data_type"] == "ANNOTATION/BITMAP_MASK"
        png = Image.open(io.BytesIO(Path(result["locator"].removeprefix("file://")).read_bytes()))
        np.testing.assert_array_equal(np.asarray(png.convert("RGBA")), colorize(array))


def scanlines_message(
    run: str, image_id: str, stream: bytes, shape: tuple[int, ...], name: str | None = None
) -> bytes:
    return msgpack.packb(
        {
            "v": 2,
            "run": run,
            "id": image_id,
            "name": name,
            "shape": list(shape),
            "scanlines": stream,
            "colormap": "jet",
            "fade": True,
        },
        use_bin_type=True,
    )


def wait_for_results(backend: redis.Redis, keys: list[str]) -> list[bytes]:
    values: list[bytes | None] = [None]
    for _ in range(600):  # up to a minute, in polls of 0.1 s
        values = backend.mget(keys)
        if all(values):
            break
        time.sleep(0.1)
    assert all(values), f"results missing: {[k for k, v in zip(keys, values, strict=True) if not v]}"
    return [v for v in values if v is not None]


def test_a_map_filtered_and_deflated_by_hand_is_stored_with_that_stream_as_its_idat(
    local_stack: Stack, module_redis: RedisServer
) -> None:
    # Given a map as PNG scanlines: even rows unfiltered, odd rows Sub-filtered, by zlib level 9
    array = np.random.default_rng(7).integers(0, 256, (13, 11), dtype=np.uint8)
    rows = np.zeros((13, 12), dtype=np.uint8)
    rows[:, 1:] = array
    rows[1::2, 0] = 1
    rows[1::2, 2:] = np.diff(array[1::2], axis=1)  # uint8: mod 256, as PNG's Sub filter
    stream = zlib.compress(rows.tobytes(), 9)
    run = "foreign-run-2"
    # When it is pushed onto the queue as docs/wire-format.md describes
    module_redis.client(0).lpush(
        "actmap", task_envelope([scanlines_message(run, "cpp/scanlines", stream, array.shape)])
    )
    # Then its PNG decodes to the colorized map, and its IDAT is the very stream sent
    [raw] = wait_for_results(
        module_redis.client(1), [f"celery-task-meta-{result_id(run, 'cpp/scanlines', None)}"]
    )
    meta = msgpack.unpackb(raw, raw=False)
    assert meta["status"] == "SUCCESS", meta
    png = Path(meta["result"]["locator"].removeprefix("file://")).read_bytes()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")), colorize(array))
    assert png_idat(png) == stream
