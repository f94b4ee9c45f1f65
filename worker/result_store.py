"""Recording each map's result in Celery's result backend, under the map's own result id."""

from __future__ import annotations

import time
from typing import Any

from celery import states
from celery.backends.base import Backend
from celery.backends.redis import RedisBackend


class ResultStore:
    """Success and failure of one map, as ``collect`` reads them (Celery's result meta).

    On Redis, successes are written as plain SETs with expiry, several per round trip: a
    few are gathered (at most ``flush_every``, for at most ``max_delay_s``) and sent in one
    pipeline. Celery's own path reads each key first and publishes to a channel nobody here
    subscribes to: three round trips per map where a fraction of one will do. A success may
    overwrite anything (a duplicate run wrote the same object, same bytes); a failure goes
    through Celery's path, which never overwrites a success. Call ``flush`` before the task
    returns: its message is acknowledged then.
    """

    def __init__(self, backend: Backend, *, flush_every: int = 16, max_delay_s: float = 0.02) -> None:
        self.backend = backend
        self.flush_every = flush_every
        self.max_delay_s = max_delay_s
        self._redis = isinstance(backend, RedisBackend)
        self._pending: list[tuple[str, bytes]] = []
        self._oldest = 0.0
        self.recorded: set[str] = set()  # result ids given an outcome through this store

    def succeeded(self, result_id: str, result: dict[str, Any]) -> None:
        self.recorded.add(result_id)
        if not self._redis:
            self.backend.mark_as_done(result_id, result)
            return
        backend: Any = self.backend
        meta = backend._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=None)
        meta["task_id"] = result_id
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((backend.get_key_for_task(result_id), backend.encode(meta)))
        if len(self._pending) >= self.flush_every or time.monotonic() - self._oldest >= self.max_delay_s:
            self.flush()

    def failed(self, result_id: str, error: Exception) -> None:
        self.recorded.add(result_id)
        self.flush()
        self.backend.mark_as_failure(result_id, error)

    def flush(self) -> None:
        """Send the successes gathered so far; retried on connection errors by the backend's policy."""
        if not self._pending:
            return
        backend: Any = self.backend
        backend.ensure(self._set_all, (list(self._pending),))
        self._pending.clear()

    def _set_all(self, items: list[tuple[str, bytes]]) -> None:
        backend: Any = self.backend
        expires_s = int(backend.expires) if backend.expires else None
        with backend.client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(key, value, ex=expires_s)
            pipe.execute()
