"""A running actmap per test module: private Redis, real worker subprocesses, S3 or a folder."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer import Producer, Settings
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.workers import WorkerProcess, clean_env


@dataclass
class Stack:
    """What a user would have: settings in the environment, workers running."""

    env: dict[str, str]
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        values = {
            k.removeprefix("ACTMAP_").lower(): v for k, v in self.env.items() if k.startswith("ACTMAP_")
        }
        return Settings(**values)

    def producer(self, run_id: str | None = None) -> Producer:
        return Producer(self.settings, run_id=run_id)

    def start_worker(self, **kwargs: object) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.log_dir, **kwargs)  # type: ignore[arg-type]
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def worker_logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def local_stack(module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis broker and results, PNGs in a local folder, one worker of two processes."""
    root = tmp_path_factory.mktemp("local-stack")
    stack = Stack(
        env={
            "ACTMAP_HOME": str(root / "home"),
            "ACTMAP_BROKER_URL": module_redis.url(0),
            "ACTMAP_RESULT_BACKEND": module_redis.url(1),
            "ACTMAP_STORAGE_URL": f"file://{root / 'maps'}",
        },
        log_dir=root,
    )
    stack.start_worker()
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def s3_stack(
    module_redis: RedisServer, s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    """Redis broker and results, PNGs in a SeaweedFS bucket under the prefix 'maps'; results kept
    2 h (not the default day, Celery's own default too: a TTL check then shows the setting works)."""
    root = tmp_path_factory.mktemp("s3-stack")
    bucket = s3_server.create_bucket()
    env = {
        "ACTMAP_HOME": str(root / "home"),
        "ACTMAP_BROKER_URL": module_redis.url(2),
        "ACTMAP_RESULT_BACKEND": module_redis.url(3),
        "ACTMAP_STORAGE_URL": f"s3://{bucket}/maps",
        "ACTMAP_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "ACTMAP_RESULT_EXPIRES_S": "7200",
        **s3_server.env(),
    }
    stack = Stack(env=env, log_dir=root)
    stack.start_worker()
    yield stack, bucket
    stack.stop()
    s3_server.delete_bucket(bucket)


__all__ = ["Stack", "clean_env"]
