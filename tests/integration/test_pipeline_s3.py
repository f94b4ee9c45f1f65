"""End to end on real parts: the public API → Redis → celery worker → SeaweedFS → results."""

from __future__ import annotations

import io
import zlib

import msgpack
import numpy as np
import pytest
from PIL import Image

from producer import CollectTimeoutError, InvalidImageIdError, InvalidMapError
from producer.celery_config import TASK_NAME
from producer.keys import result_id
from tests.integration.conftest import Stack
from tests.support.seaweedfs import SeaweedS3
from worker.render import colorize


def smooth_map(rng: np.random.Generator, height: int, width: int, dtype: type = np.float32) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
    return (cam / cam.max()).astype(dtype)


def fetch_rgba(s3_server: SeaweedS3, locator: str) -> np.ndarray:
    bucket, key = locator.removeprefix("s3://").split("/", 1)
    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG" and image.mode == "P"
    return np.asarray(image.convert("RGBA"))


def test_maps_of_every_accepted_kind_come_back_as_the_expected_jet_pngs_in_s3(
    s3_stack: tuple[Stack, str], s3_server: SeaweedS3
) -> None:
    # Given maps of every accepted dtype and shape, some named, one without fading
    stack, bucket = s3_stack
    rng = np.random.default_rng(1)
    maps = {
        ("img-u8", None, True): rng.integers(0, 256, (40, 56), dtype=np.uint8),
        ("img-f16", None, True): smooth_map(rng, 64, 48, np.float16),
        ("img-f32", None, True): smooth_map(rng, 224, 224, np.float32),
        ("val/img-f64", None, False): smooth_map(rng, 30, 31, np.float64),
        ("img-chan", None, True): smooth_map(rng, 20, 24)[..., None],
        ("img-multi", "cat", True): smooth_map(rng, 16, 16),
        ("img-multi", "dog", True): smooth_map(rng, 16, 16),
    }
    # When they are submitted through the public API and collected
    with stack.producer() as producer:
        pending = [
            producer.submit(image_id, cam, name=name, fade_low_activation=fade)
            for (image_id, name, fade), cam in maps.items()
        ]
        results = producer.collect(pending, timeout=60)
    # Then each result is a stored PNG that decodes to exactly the colorized map
    assert [(r.image_id, r.name) for r in results] == [(i, n) for i, n, _ in maps]
    for ((image_id, name, fade), cam), result in zip(maps.items(), results, strict=True):
        assert result.error is None, result.error
        stem = image_id if name is None else f"{image_id}~{name}"
        assert result.locator == f"s3://{bucket}/maps/{stem}.png"
        assert result.bitmap_mask == {"locator": result.locator, "data_type": "ANNOTATION/BITMAP_MASK"}
        assert (result.height, result.width) == cam.shape[:2]
        expected = colorize(cam, fade_low_activation=fade)
        np.testing.assert_array_equal(fetch_rgba(s3_server, result.locator), expected)
        assert result.checksum is not None and result.checksum.startswith("md5:")
        head = s3_server.client().head_object(Bucket=bucket, Key=result.locator.split("/", 3)[3])
        assert head["ETag"].strip('"') == result.checksum.removeprefix("md5:")
        assert head["ContentLength"] == result.bytes


def test_kolena_published_check_values_hold_for_a_float_map_through_the_whole_pipeline(
    s3_stack: tuple[Stack, str], s3_server: SeaweedS3
) -> None:
    stack, _ = s3_stack
    with stack.producer() as producer:
        handles = [
            producer.submit(f"check-{dtype.__name__}", np.array([[0.627, 0.875, 1.0]], dtype=dtype))
            for dtype in (np.float32, np.float64)
        ]
        results = producer.collect(handles, timeout=60)
    for result in results:
        assert result.locator is not None, result.error
        rgba = fetch_rgba(s3_server, result.locator)
        assert rgba[0].tolist() == [[255, 252, 0, 250], [255, 0, 0, 254], [128, 0, 0, 254]]


def test_submit_many_batches_maps_and_collect_reads_them_in_one_mget_not_one_get_each(
    s3_stack: tuple[Stack, str], module_redis
) -> None:
    stack, _ = s3_stack
    rng = np.random.default_rng(2)
    items = [(f"batch/{i:03d}", smooth_map(rng, 32, 32)) for i in range(120)]
    with stack.producer() as producer:
        pending = producer.submit_many(items)
        assert all(r.ok for r in producer.collect(pending, timeout=60))
        run_id = producer.run_id
    # With every result ready (the worker idle), count the commands one collect sends.
    results_db = module_redis.client(db=3)
    before = results_db.info("commandstats")
    with stack.producer(run_id=run_id) as fresh:
        results = fresh.collect([image_id for image_id, _ in items], timeout=60)
    after = results_db.info("commandstats")
    assert [r.image_id for r in results] == [image_id for image_id, _ in items]
    assert all(r.ok for r in results)
    assert calls(after, "mget") - calls(before, "mget") == 1
    assert calls(after, "get") - calls(before, "get") == 0


def calls(stats: dict[str, dict[str, int]], command: str) -> int:
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_new_producer_collects_a_run_by_run_id_and_image_ids_alone(s3_stack: tuple[Stack, str]) -> None:
    stack, _ = s3_stack
    cam = smooth_map(np.random.default_rng(3), 24, 24)
    with stack.producer(run_id="assembly-run-1") as producer:
        producer.submit("elsewhere-1", cam)
        producer.submit("elsewhere-2", cam, name="heads")
    with stack.producer(run_id="assembly-run-1") as other:
        results = other.collect(["elsewhere-1", ("elsewhere-2", "heads")], timeout=60)
    assert [r.ok for r in results] == [True, True]
    assert results[1].locator is not None and results[1].locator.endswith("/maps/elsewhere-2~heads.png")


def test_resubmitting_an_image_id_in_a_new_run_gives_that_runs_result_not_the_old_one(
    s3_stack: tuple[Stack, str],
) -> None:
    stack, _ = s3_stack
    good = smooth_map(np.random.default_rng(4), 24, 24)
    with stack.producer(run_id="first-run") as first:
        assert first.collect([first.submit("again", good)], timeout=60)[0].ok
    # The second run's map is broken on the worker side (see the poison test for how);
    # if results were keyed by image id alone, collect would return the first run's success.
    with stack.producer(run_id="second-run") as second:
        second._app.send_task(TASK_NAME, args=[[raw_map("second-run", "again", shape=[5, 5])]])
        result = second.collect(["again"], timeout=60)[0]
    assert result.error is not None and result.error.type == "MapDecodeError"


def test_collect_times_out_saying_how_many_maps_are_still_pending(s3_stack: tuple[Stack, str]) -> None:
    stack, _ = s3_stack
    cam = smooth_map(np.random.default_rng(5), 8, 8)
    with stack.producer() as producer:
        done = producer.submit("arrives", cam)
        producer.collect([done], timeout=60)
        with pytest.raises(CollectTimeoutError, match=r"2 of 3 map results still pending") as caught:
            producer.collect([done, "never-sent-1", "never-sent-2"], timeout=0.5)
    assert caught.value.pending == 2
    assert [r.ok for r in caught.value.results] == [True, False, False]


def test_results_expire_after_the_configured_time(s3_stack: tuple[Stack, str], module_redis) -> None:
    # Given a stack whose results are kept ACTMAP_RESULT_EXPIRES_S=7200 s, not Celery's default day
    stack, _ = s3_stack
    assert stack.settings.result_expires_s == 7200
    # When a map is done and its result collected
    with stack.producer() as producer:
        handle = producer.submit("expiring", smooth_map(np.random.default_rng(6), 8, 8))
        producer.collect([handle], timeout=60)
    # Then its result key expires in 2 h (a minute of slack for the time since it was written)
    ttl = module_redis.client(db=3).ttl(f"celery-task-meta-{handle.result_id}")
    assert 7200 - 60 < ttl <= 7200, ttl


def test_bad_maps_are_refused_by_the_producer_at_once_with_what_was_received(
    s3_stack: tuple[Stack, str],
) -> None:
    stack, _ = s3_stack
    with stack.producer() as producer:
        with pytest.raises(InvalidMapError, match=r"3 channels"):
            producer.submit("rgb", np.zeros((8, 8, 3), np.uint8))
        with pytest.raises(InvalidMapError, match=r"int64"):
            producer.submit("ints", np.zeros((8, 8), np.int64))
        with pytest.raises(InvalidMapError, match=r"NaN"):
            producer.submit("nan", np.full((8, 8), np.nan, np.float32))
        with pytest.raises(InvalidMapError, match=r"1\.5"):
            producer.submit("hot", np.full((8, 8), 1.5, np.float32))
        with pytest.raises(InvalidMapError, match=r"unknown colormap 'hot'"):
            producer.submit("cmap", np.zeros((8, 8), np.uint8), colormap="hot")
        with pytest.raises(InvalidImageIdError, match=r"'\.\.'"):
            producer.submit("../escape", np.zeros((8, 8), np.uint8))


def raw_map(run: str, image_id: str, intensities: np.ndarray | None = None, **fields: object) -> bytes:
    """A map message as a hostile or buggy producer might send it, bypassing our client: a 4x4
    map of zeros (or ``intensities``), its rows unfiltered, any field replaced by ``fields``."""
    array = np.zeros((4, 4), np.uint8) if intensities is None else intensities
    rows = np.hstack([np.zeros((array.shape[0], 1), np.uint8), array])  # filter byte 0: None
    message = {
        "v": 2,
        "run": run,
        "id": image_id,
        "name": None,
        "shape": list(array.shape),
        "scanlines": zlib.compress(rows.tobytes()),
        "colormap": "jet",
        "fade": True,
    }
    message.update(fields)
    return msgpack.packb(message, use_bin_type=True)


@pytest.mark.parametrize(
    ("fields", "error_type", "says"),
    [
        (
            {"scanlines": zlib.compress(bytes(19))},
            "MapDecodeError",
            "map scanlines inflate to 19 bytes; shape [4, 4] needs 4 rows of 1 + 4 bytes, 20",
        ),
        ({"shape": [100000, 100000]}, "MapDecodeError", "10000000000 pixels; expected at most"),
        ({"scanlines": zlib.compress(bytes([5]) + bytes(19))}, "MapDecodeError", "filter type 5"),
        ({"shape": [4, 4, 1]}, "MapDecodeError", "map shape must be [h, w] of ints"),
        ({"colormap": "nope"}, "MapDecodeError", "unknown colormap 'nope'"),
        ({"v": 1}, "MapDecodeError", "version is 1; this worker reads version 2"),
        ({"v": 99}, "MapDecodeError", "version is 99"),
        ({"fade": "yes"}, "MapDecodeError", "'fade' must be bool"),
    ],
)
def test_a_bad_map_sent_around_the_client_fails_with_a_clear_error_and_the_worker_goes_on(
    s3_stack: tuple[Stack, str], fields: dict[str, object], error_type: str, says: str
) -> None:
    stack, _ = s3_stack
    with stack.producer() as producer:
        good = raw_map(producer.run_id, "good-after", np.arange(16, dtype=np.uint8).reshape(4, 4))
        producer._app.send_task(TASK_NAME, args=[[raw_map(producer.run_id, "bad", **fields), good]])
        bad_result, good_result = producer.collect(["bad", "good-after"], timeout=60)
    assert bad_result.error is not None
    assert bad_result.error.type == error_type
    assert says in bad_result.error.message
    assert good_result.ok, good_result.error


def test_unreadable_messages_are_recorded_under_the_task_id_and_not_retried(
    s3_stack: tuple[Stack, str],
) -> None:
    stack, _ = s3_stack
    logged_before = len(stack.worker_logs())  # the module's worker: only this test's lines count
    with stack.producer() as producer:
        truncated = raw_map(producer.run_id, "whole")[:-5]
        task = producer._app.send_task(TASK_NAME, args=[[b"\xc1not msgpack", truncated]])
        meta = next(producer._app.backend.get_many([task.id], timeout=60, interval=0.1))[1]
        good = producer.submit("after-poison", np.zeros((4, 4), np.uint8))
        assert producer.collect([good], timeout=60)[0].ok
    assert meta["status"] == "FAILURE"
    assert "2 of 2 map messages unreadable" in str(meta["result"])
    assert "not valid msgpack" in str(meta["result"])
    # Neither retried by Celery ("Retry in", a raised task.retry) nor by actmap's own retry rounds
    # (task.retry(throw=False), which Celery does not log)
    logs = stack.worker_logs()[logged_before:]
    assert "Retry in" not in logs
    assert "retrying " not in logs and "again in" not in logs


def test_pickle_and_json_task_messages_are_refused_by_the_worker(s3_stack: tuple[Stack, str]) -> None:
    stack, _ = s3_stack
    with stack.producer() as producer:
        app = producer._app
        for serializer in ("pickle", "json"):
            payload = raw_map(producer.run_id, f"via-{serializer}")
            app.send_task(TASK_NAME, args=[[payload.hex()]], serializer=serializer)
        after = producer.submit("after-refused", np.zeros((4, 4), np.uint8))
        assert producer.collect([after], timeout=60)[0].ok
        with pytest.raises(CollectTimeoutError):
            producer.collect(["via-pickle", "via-json"], timeout=1)
    logs = stack.worker_logs()
    assert "Refusing to deserialize untrusted content of type pickle" in logs
    assert "Refusing to deserialize untrusted content of type json" in logs


def test_result_ids_are_per_run_image_and_name() -> None:
    ids = [result_id("r", "a"), result_id("r", "a", "cat"), result_id("r2", "a")]
    assert len(set(ids)) == len(ids)
