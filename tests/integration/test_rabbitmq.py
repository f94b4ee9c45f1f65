"""RabbitMQ as the broker (results in Redis): the same code, through the public API, on real processes.

Each module gets a fresh vhost on the machine's RabbitMQ server (deleted afterwards), a private
redis-server for results, PNGs in a local folder and a real ``actmap worker``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.celery_config import TASK_NAME
from producer.wire import MapMessage, encode_map
from tests.integration.conftest import Stack
from tests.integration.test_pipeline_s3 import raw_map
from tests.support.ports import free_port
from tests.support.rabbitmq import RabbitVhost, require_rabbitmq
from tests.support.redis_server import RedisServer
from worker.render import colorize


@pytest.fixture(scope="module")
def rabbit_vhost() -> Iterator[RabbitVhost]:
    require_rabbitmq()
    with RabbitVhost() as vhost:
        yield vhost


@pytest.fixture(scope="module")
def rabbit_stack(rabbit_vhost: RabbitVhost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """RabbitMQ broker (own vhost), Redis results, PNGs in a local folder, one worker of two processes."""
    root = tmp_path_factory.mktemp("rabbit-stack")
    with RedisServer() as redis_server:
        stack = Stack(
            env={
                "ACTMAP_HOME": str(root / "home"),
                "ACTMAP_BROKER_URL": rabbit_vhost.url,
                "ACTMAP_RESULT_BACKEND": redis_server.url(0),
                "ACTMAP_STORAGE_URL": f"file://{root / 'maps'}",
                "ACTMAP_BATCH_SIZE": "4",
            },
            log_dir=root,
        )
        stack.start_worker()
        try:
            yield stack
        finally:
            stack.stop()


def decode(locator: str) -> np.ndarray:
    image = Image.open(locator.removeprefix("file://"))
    assert image.format == "PNG" and image.mode == "P"
    return np.asarray(image.convert("RGBA"))


def test_maps_submitted_one_by_one_and_in_batches_come_back_as_the_colorized_pngs(
    rabbit_stack: Stack, rabbit_vhost: RabbitVhost
) -> None:
    # Given float and uint8 maps, one named, one without fading, and ten more for submit_many
    rng = np.random.default_rng(5)
    single: dict[tuple[str, str | None, bool], np.ndarray] = {
        ("rmq/f32", None, True): rng.random((64, 48), dtype=np.float32),
        ("rmq/u8", None, True): rng.integers(0, 256, (30, 40), dtype=np.uint8),
        ("rmq/named", "cat", False): rng.random((16, 16)),
    }
    many = {f"rmq/many-{i}": rng.random((24, 20), dtype=np.float32) for i in range(10)}
    # When they are submitted through the public API over RabbitMQ and collected from Redis
    with rabbit_stack.producer() as producer:
        pending = [
            producer.submit(image_id, cam, name=name, fade_low_activation=fade)
            for (image_id, name, fade), cam in single.items()
        ]
        pending += producer.submit_many(many.items())
        results = producer.collect(pending, timeout=60)
    # Then every result is a PNG in the folder that decodes to exactly the colorized map
    expected: list[tuple[str, str | None, bool, np.ndarray]] = [
        (i, n, f, cam) for (i, n, f), cam in single.items()
    ] + [(i, None, True, cam) for i, cam in many.items()]
    maps_url = rabbit_stack.env["ACTMAP_STORAGE_URL"]
    for (image_id, name, fade, cam), result in zip(expected, results, strict=True):
        assert result.error is None, result.error
        stem = image_id if name is None else f"{image_id}~{name}"
        assert result.locator == f"{maps_url}/{stem}.png"
        assert (result.height, result.width) == cam.shape
        np.testing.assert_array_equal(decode(result.locator), colorize(cam, fade_low_activation=fade))
    # and the maps went through a durable, replicated quorum queue on a topic exchange
    assert rabbit_vhost.queues()["actmap"]["type"] == "quorum"
    assert rabbit_vhost.exchanges()["actmap"] == "topic"
    assert "Global QoS is disabled" in rabbit_stack.worker_logs()


def test_a_bad_map_sent_around_the_client_fails_with_a_clear_error_and_the_worker_goes_on(
    rabbit_stack: Stack,
) -> None:
    # Given a map whose scanlines have an unknown filter type, published by hand before a good one
    with rabbit_stack.producer() as producer:
        bad = raw_map(producer.run_id, "rmq/bad", scanlines=zlib.compress(bytes([7]) + bytes(19)))
        good = encode_map(MapMessage(producer.run_id, "rmq/good-after", None, np.zeros((4, 4), np.uint8)))
        producer._app.send_task(TASK_NAME, args=[[bad, good]], queue=producer.settings.queue)
        # When both are collected, and another map is submitted afterwards
        bad_result, good_result = producer.collect(["rmq/bad", "rmq/good-after"], timeout=60)
        later = producer.collect([producer.submit("rmq/later", np.ones((4, 4), np.uint8))], timeout=60)[0]
    # Then the bad map failed, saying why, and the worker went on with the others
    assert bad_result.error is not None
    assert bad_result.error.type == "MapDecodeError"
    assert "map scanline 0 has filter type 7; expected 0 (None) or 1 (Sub)" in bad_result.error.message
    assert good_result.ok, good_result.error
    assert later.ok, later.error


def test_storage_errors_are_retried_with_countdowns_through_rabbitmq_delayed_delivery_then_reported(
    tmp_path: Path,
) -> None:
    # Given a worker on RabbitMQ whose S3 endpoint refuses every connection, with a small retry bound
    require_rabbitmq()
    with RabbitVhost() as vhost, RedisServer() as redis_server:
        env = {
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": vhost.url,
            "ACTMAP_RESULT_BACKEND": redis_server.url(0),
            "ACTMAP_STORAGE_URL": "s3://nowhere/maps",
            "ACTMAP_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "ACTMAP_STORAGE_MAX_ATTEMPTS": "1",
            "ACTMAP_TASK_MAX_RETRIES": "2",
            "ACTMAP_RETRY_BACKOFF_MAX_S": "2",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        stack = Stack(env=env, log_dir=tmp_path)
        stack.start_worker()
        try:
            # When a map is submitted
            with stack.producer() as producer:
                result = producer.collect(
                    [producer.submit("rmq/unlucky", np.zeros((4, 4), np.uint8))], timeout=30
                )[0]
            exchanges = vhost.exchanges()
        finally:
            stack.stop()
    # Then it ends FAILED, naming the cause, after exactly the configured retries
    assert result.error is not None, "the map was stored although S3 was unreachable"
    assert result.error.type == "StorageError"
    assert "gave up after 2 retries" in result.error.message
    assert "Could not connect" in result.error.message
    logs = stack.worker_logs()
    assert logs.count("retrying 1 map(s)") == 2
    # and the retries waited in RabbitMQ's delayed-delivery queues, not in a worker
    assert exchanges.get("celery_delayed_0") == "topic"
    assert "countdown must be a positive number" not in logs
    assert "direct exchange" not in logs
