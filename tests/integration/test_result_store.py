"""Per-map results in a real Redis result backend: what collect reads, and which write wins."""

from __future__ import annotations

from celery import Celery

from producer.errors import InvalidMapError, StorageError
from tests.support.redis_server import RedisServer
from worker.result_store import ResultStore

RESULT = {"image_id": "a", "name": None, "locator": "file:///a.png"}


def backend_on(redis_server: RedisServer, expires_s: int = 120) -> Celery:
    app = Celery(set_as_current=False)
    app.conf.update(
        result_backend=redis_server.url(1),
        result_serializer="msgpack",
        result_accept_content=["msgpack"],
        result_expires=expires_s,
    )
    return app


def test_a_success_is_read_back_as_celery_meta_and_expires(redis_server: RedisServer) -> None:
    app = backend_on(redis_server, expires_s=120)
    store = ResultStore(app.backend)
    store.succeeded("rid-1", RESULT)
    store.flush()
    meta = dict(app.backend.get_many(["rid-1"], timeout=5))["rid-1"]
    assert meta["status"] == "SUCCESS" and meta["result"] == RESULT
    assert 0 < redis_server.client(1).ttl("celery-task-meta-rid-1") <= 120


def test_a_failure_of_a_duplicate_run_never_overwrites_a_success(redis_server: RedisServer) -> None:
    app = backend_on(redis_server)
    store = ResultStore(app.backend)
    store.succeeded("rid-2", RESULT)  # gathered, then sent before the failure is
    store.failed("rid-2", StorageError("a late duplicate failed"))
    meta = dict(backend_on(redis_server).backend.get_many(["rid-2"], timeout=5))["rid-2"]
    assert meta["status"] == "SUCCESS"


def test_a_later_success_replaces_a_failure(redis_server: RedisServer) -> None:
    app = backend_on(redis_server)
    store = ResultStore(app.backend)
    store.failed("rid-3", InvalidMapError("bad"))
    store.succeeded("rid-3", RESULT)
    store.flush()
    meta = dict(backend_on(redis_server).backend.get_many(["rid-3"], timeout=5))["rid-3"]
    assert meta["status"] == "SUCCESS"


def test_successes_are_gathered_and_sent_together_up_to_the_bound(redis_server: RedisServer) -> None:
    app = backend_on(redis_server)
    store = ResultStore(app.backend, flush_every=3, max_delay_s=60)
    reader = backend_on(redis_server).backend
    store.succeeded("batch-1", RESULT)
    store.succeeded("batch-2", RESULT)
    assert redis_server.client(1).exists("celery-task-meta-batch-1") == 0  # not sent yet
    store.succeeded("batch-3", RESULT)  # the third fills the batch: all three go
    metas = dict(reader.get_many(["batch-1", "batch-2", "batch-3"], timeout=5))
    assert {m["status"] for m in metas.values()} == {"SUCCESS"}
