"""ACTMAP_S3_CLIENT=obstore: real workers storing maps in a real S3 server through obstore.

What S3Storage (boto3) guarantees must hold for it too: the same objects, their MD5 as ETag and
checksum, server-side encryption, refusals S3 will not change reported at once (not retried),
credentials from boto3's chain. Its faults and bit flips are in tests/reliability/test_s3_faults.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.errors import StorageError, StorageRejectedError
from producer.keys import object_key
from producer.settings import Settings
from tests.integration.conftest import Stack
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from worker.render import render_png
from worker.storage import open_storage

pytest.importorskip("obstore", reason="obstore is not installed (pip install -e '.[obstore]')")


@pytest.fixture(scope="module")
def obstore_env(
    module_redis: RedisServer, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The environment of workers on obstore, storing to a bucket of their own."""
    root = tmp_path_factory.mktemp("obstore")
    bucket = s3_server.create_bucket()
    yield {
        "ACTMAP_HOME": str(root / "home"),
        "ACTMAP_BROKER_URL": module_redis.url(4),
        "ACTMAP_RESULT_BACKEND": module_redis.url(5),
        "ACTMAP_STORAGE_URL": f"s3://{bucket}/maps",
        "ACTMAP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ACTMAP_S3_CLIENT": "obstore",
        "ACTMAP_TASK_MAX_RETRIES": "1",
        "ACTMAP_RETRY_BACKOFF_MAX_S": "1",
        **s3_server.env(),
    }
    s3_server.delete_bucket(bucket)


def stack_of(env: dict[str, str], log_dir: Path, **changes: str) -> Stack:
    stack = Stack(env={**env, **changes}, log_dir=log_dir)
    stack.start_worker(concurrency=1)
    return stack


def test_maps_are_stored_as_boto3_stores_them_with_their_md5_as_checksum_and_etag(
    obstore_env: dict[str, str], s3_server: SeaweedS3, tmp_path: Path
) -> None:
    # Given a worker whose S3 client is obstore, and its server-side encryption on
    stack = stack_of(obstore_env, tmp_path, ACTMAP_S3_SERVER_SIDE_ENCRYPTION="AES256")
    bucket = obstore_env["ACTMAP_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    rng = np.random.default_rng(3)
    maps = {f"ob/{i}": rng.random((40 + i, 56), dtype=np.float32) for i in range(6)}
    try:
        # When maps are submitted and collected
        with stack.producer() as producer:
            results = producer.collect([producer.submit(i, cam) for i, cam in maps.items()], timeout=60)
    finally:
        stack.stop()
    # Then each object is render_png's PNG, typed, encrypted at rest, its MD5 the ETag and checksum
    client = s3_server.client()
    try:
        for (image_id, cam), result in zip(maps.items(), results, strict=True):
            assert result.ok, result.error
            key = object_key("maps", image_id)
            assert result.locator == f"s3://{bucket}/{key}"
            head = client.head_object(Bucket=bucket, Key=key)
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            png = render_png(cam)
            assert body == png
            assert head["ContentType"] == "image/png"
            assert head.get("ServerSideEncryption") == "AES256"
            md5 = hashlib.md5(png).hexdigest()
            assert result.checksum == f"md5:{md5}" == f"md5:{head['ETag'].strip(chr(34))}"
    finally:
        client.close()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"ACTMAP_STORAGE_URL": "s3://ab/maps"}, "InvalidBucketName"),  # a name S3 refuses
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "403"),  # from boto3's chain, and wrong
    ],
    ids=["invalid-bucket", "wrong-secret"],
)
def test_a_refusal_s3_will_not_change_fails_the_map_at_once_naming_it(
    obstore_env: dict[str, str], tmp_path: Path, change: dict[str, str], code: str
) -> None:
    # Given a worker on obstore whose every PUT is refused
    stack = stack_of(obstore_env, tmp_path, **change)
    try:
        # When a map is submitted
        with stack.producer() as producer:
            handle = producer.submit(f"refused/{code}", np.zeros((8, 8), np.uint8))
            result = producer.collect([handle], timeout=60)[0]
        logs = stack.worker_logs()
    finally:
        stack.stop()
    # Then it failed as refused, saying why, and was not retried
    assert result.error is not None and result.error.type == "StorageRejectedError", result.error
    assert code in result.error.message, result.error.message
    assert "will be retried" not in logs
    assert change.get("AWS_SECRET_ACCESS_KEY", "no secret here") not in logs + result.error.message


def test_a_connection_failure_is_retried_even_when_the_key_names_an_s3_error_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The error's text holds the URL: a key with "AccessDenied" in it must not make it permanent
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    settings = Settings(
        home=tmp_path,
        storage_url="s3://bucket/maps",
        s3_client="obstore",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        s3_region="us-east-1",
        storage_max_attempts=1,
    )
    storage = open_storage(settings).storage
    with pytest.raises(StorageError) as raised:
        storage.put("maps/val/AccessDenied-report.png", b"png bytes")
    assert not isinstance(raised.value, StorageRejectedError), raised.value
    assert "AccessDenied-report.png" in str(raised.value)
