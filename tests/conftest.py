"""Shared fixtures: real, private Redis and S3 (SeaweedFS) servers on 127.0.0.1 free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server (no persistence) for the whole session; never the system 6379."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of db 0 on the session Redis, FLUSHALLed before each test.

    FLUSHALL rather than FLUSHDB: Celery setups here use several dbs (broker, results).
    """
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url(0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A private SeaweedFS S3 endpoint with SigV4 auth for the whole session."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> Iterator[str]:
    """A fresh, uniquely named, empty bucket; deleted (with its contents) after the test."""
    name = s3_server.create_bucket()
    yield name
    # Each bucket holds a SeaweedFS volume; deleting it frees that slot for later tests.
    s3_server.delete_bucket(name)
