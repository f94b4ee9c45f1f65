"""S3 over TLS with a private CA: real workers storing maps to SeaweedFS over HTTPS, on boto3 and obstore.

The CA and the server certificate (for 127.0.0.1) are made for this module by `openssl`; SeaweedFS serves
S3 over HTTPS with them (`-s3.port.https`, `-s3.cert.file`, `-s3.key.file`). Workers learn the CA from the
standard AWS_CA_BUNDLE variable: boto3 reads it itself, and actmap hands what boto3 reads to obstore
(`root_certificate`). Without it the certificate is not trusted, and every map fails at once, saying so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from producer.keys import object_key
from tests.integration.conftest import Stack
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.tls import TlsFiles, make_tls_files
from worker.render import render_png


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("s3-tls"))


@pytest.fixture(scope="module")
def https_s3(tls_files: TlsFiles) -> Iterator[SeaweedS3]:
    with SeaweedS3(tls=tls_files) as server:
        yield server


@pytest.fixture
def bucket(https_s3: SeaweedS3) -> Iterator[str]:
    name = https_s3.create_bucket()
    yield name
    https_s3.delete_bucket(name)


_dbs = iter(range(0, 16, 2))  # a broker and a result db per stack: no worker takes another's maps


def tls_stack(
    redis: RedisServer, s3: SeaweedS3, bucket: str, client: str, log_dir: Path, **changes: str
) -> Stack:
    """One worker on ``client``, storing to ``bucket`` over HTTPS, with ``changes`` to its environment."""
    if client == "obstore":
        pytest.importorskip("obstore", reason="obstore is not installed (pip install -e '.[obstore]')")
    db = next(_dbs)
    stack = Stack(
        env={
            "ACTMAP_HOME": str(log_dir / "home"),
            "ACTMAP_BROKER_URL": redis.url(db),
            "ACTMAP_RESULT_BACKEND": redis.url(db + 1),
            "ACTMAP_STORAGE_URL": f"s3://{bucket}/maps",
            "ACTMAP_S3_ENDPOINT_URL": s3.endpoint_url,
            "ACTMAP_S3_CLIENT": client,
            "ACTMAP_TASK_MAX_RETRIES": "1",
            "ACTMAP_RETRY_BACKOFF_MAX_S": "1",
            **s3.env(),
            **changes,
        },
        log_dir=log_dir,
    )
    stack.start_worker(concurrency=1)
    return stack


@pytest.mark.parametrize("client", ["boto3", "obstore"])
def test_a_worker_given_the_private_ca_in_aws_ca_bundle_stores_maps_over_https(
    client: str,
    module_redis: RedisServer,
    https_s3: SeaweedS3,
    bucket: str,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    # Given a worker whose S3 endpoint is HTTPS, its certificate signed by a CA named in AWS_CA_BUNDLE
    assert https_s3.endpoint_url.startswith("https://127.0.0.1:")
    stack = tls_stack(module_redis, https_s3, bucket, client, tmp_path, AWS_CA_BUNDLE=str(tls_files.ca_cert))
    rng = np.random.default_rng(11)
    maps = {f"tls/{client}/{i}": rng.random((32 + i, 48), dtype=np.float32) for i in range(4)}
    try:
        # When maps are submitted and collected
        with stack.producer() as producer:
            results = producer.collect([producer.submit(i, cam) for i, cam in maps.items()], timeout=60)
    finally:
        stack.stop()
    # Then each object, read back over HTTPS, is the map's PNG, its MD5 the result's checksum
    reader = https_s3.client()
    try:
        for (image_id, cam), result in zip(maps.items(), results, strict=True):
            assert result.ok, result.error
            key = object_key("maps", image_id)
            assert result.locator == f"s3://{bucket}/{key}"
            body = reader.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert body == render_png(cam)
            assert result.checksum == f"md5:{hashlib.md5(body, usedforsecurity=False).hexdigest()}"
    finally:
        reader.close()


@pytest.mark.parametrize("client", ["boto3", "obstore"])
def test_a_worker_that_does_not_trust_the_certificate_fails_the_map_at_once_saying_so(
    client: str, module_redis: RedisServer, https_s3: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    # Given a worker on the HTTPS endpoint with no CA bundle: the private CA is in no trust store
    stack = tls_stack(module_redis, https_s3, bucket, client, tmp_path)
    assert "AWS_CA_BUNDLE" not in stack.env
    try:
        # When a map is submitted
        with stack.producer() as producer:
            handle = producer.submit(f"untrusted/{client}", np.eye(8, dtype=np.uint8))
            result = producer.collect([handle], timeout=60)[0]
        logs = stack.worker_logs()
    finally:
        stack.stop()
    # Then it failed for good, saying the certificate is not trusted and what is expected, not retried
    assert result.error is not None and result.error.type == "StorageRejectedError", result.error
    assert "TLS certificate is not trusted" in result.error.message, result.error.message
    assert "AWS_CA_BUNDLE" in result.error.message, result.error.message
    assert "will be retried" not in logs
    # and nothing was stored
    reader = https_s3.client()
    try:
        assert reader.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    finally:
        reader.close()
