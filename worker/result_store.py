"""Recording each map's result in Celery's result backend, under the map's own result id."""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import Backend
from celery.backends.redis import RedisBackend


class ResultStore:
    """Success and failure of one map, as ``collect`` reads them (Celery's result meta).

    On Redis a success is one SET with expiry: Celery's own path reads the key first and
    publishes to a channel nobody here subscribes to, three round trips where one will do.
    A success may overwrite anything (a duplicate run writes the same object, same bytes);
    a failure goes through Celery's path, which never overwrites a success.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._redis = isinstance(backend, RedisBackend)

    def succeeded(self, result_id: str, result: dict[str, Any]) -> None:
        if not self._redis:
            self.backend.mark_as_done(result_id, result)
            return
        backend: Any = self.backend
        meta = backend._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=None)
        meta["task_id"] = result_id
        key = backend.get_key_for_task(result_id)
        expires = int(backend.expires) if backend.expires else None
        # ensure() retries on connection errors with the backend's own retry policy.
        backend.ensure(self._set, (key, backend.encode(meta), expires))

    def _set(self, key: str, value: bytes, expires_s: int | None) -> None:
        client: Any = self.backend.client  # type: ignore[attr-defined]
        client.set(key, value, ex=expires_s)

    def failed(self, result_id: str, error: Exception) -> None:
        self.backend.mark_as_failure(result_id, error)
