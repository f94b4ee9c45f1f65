"""Waiting for many maps' results at a cost that follows the results that arrive.

Celery's ``get_many`` reads every still-pending id on every poll, computing each key again:
O(pending) work per poll, O(N²) over a run of N maps, on the producer's CPU and on Redis.
Here each id's key is computed once, and a poll reads at most a
window of the *oldest* pending ids: maps are rendered roughly in submission order, so the
oldest are the ones about to arrive. When half a window or more turns out ready, the next one
is read at once, so catching up on many finished results takes one round trip per window.

Only key-value result backends have ``mget``: Redis and the filesystem backend, the two
actmap supports. Values are decoded and judged ready the way Celery's ``get_many`` does.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis
from celery import states
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

log = logging.getLogger("actmap.producer")

# A result backend that cannot answer for now: Redis restarting, a network blip (the
# filesystem backend raises OSError); not those no wait mends (see _cannot_pass).
BACKEND_ERRORS = (redis.RedisError, OSError)


def _cannot_pass(exc: BaseException) -> bool:
    """An error no wait will mend: a refused password or permission, a certificate not trusted."""
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
        return True
    cause: BaseException | None = exc
    while cause is not None:  # redis-py raises ConnectionError while handling the SSL error
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# Keys per MGET: a reply short enough not to hold up the workers' writes (Redis runs one
# command at a time), and more than the maps a dead worker's messages can hold up.
WINDOW = 512

Result = tuple[str, dict[str, Any]]


class ResultPoller:
    """The results of ``ids`` (in submission order), read a window of the oldest at a time.

    ``read_oldest`` and ``read_all`` read the backend; ``take_arrived`` hands out what they
    found. ``pending`` holds the ids without a ready result, as far as the poller has read.
    """

    def __init__(self, backend: Any, ids: Iterable[str], *, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, received {window}")
        self._backend = backend
        self._window = window
        # Pending id -> its key, computed once; dict order is submission order, duplicates dropped.
        self._keys: dict[str, Any] = {rid: backend.get_key_for_task(rid) for rid in ids}
        self._queue: deque[str] = deque(self._keys)  # the pending ids, oldest first
        self._arrived: list[Result] = []

    @property
    def pending(self) -> Collection[str]:
        """The ids not yet seen with a ready result (a live view); those past the window are unread."""
        return self._keys.keys()

    def read_oldest(self) -> bool:
        """Read the oldest ``window`` pending ids; True if at least half of them arrived.

        Then reading again at once is worth it: it costs at most two keys read per result
        arrived. Otherwise the caller waits, and the next read starts from the same ids.
        """
        window = take_oldest(self._queue, self._window)
        try:
            arrived = self._read(window)
        finally:  # read or not (the backend unreachable), those still pending go back in front
            self._queue.extendleft(reversed([rid for rid in window if rid in self._keys]))
        return len(window) > 0 and 2 * arrived >= len(window)

    def read_all(self) -> None:
        """Read every pending id, a window per MGET (on a timeout, or before sending maps again)."""
        ids = list(self._queue)
        try:
            for start in range(0, len(ids), self._window):
                self._read(ids[start : start + self._window])
        finally:
            self._queue = deque(rid for rid in ids if rid in self._keys)

    def take_arrived(self) -> list[Result]:
        """The results read since the last call, each (id, Celery meta) once."""
        arrived, self._arrived = self._arrived, []
        return arrived

    def _read(self, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        keys = [self._keys[rid] for rid in ids]
        values = self._backend.mget(keys)
        if isinstance(values, Mapping):  # some clients (memcached) answer a mapping of key -> value
            values = [values.get(key) for key in keys]
        count = 0
        for rid, value in zip(ids, values, strict=True):
            if value is None:
                continue
            meta: dict[str, Any] = self._backend.decode_result(value)
            if meta["status"] in states.READY_STATES:
                del self._keys[rid]
                self._arrived.append((rid, meta))
                count += 1
        return count


def take_oldest(queue: deque[str], size: int) -> list[str]:
    """Remove and return the first ``size`` ids of ``queue`` (all of them if fewer)."""
    return [queue.popleft() for _ in range(min(size, len(queue)))]


def poll_results(
    backend: Any,
    ids: Iterable[str],
    *,
    timeout: float | None,
    interval_s: float,
    between_polls: Callable[[Callable[[], list[str]]], object] | None = None,
    window: int = WINDOW,
) -> Iterator[Result]:
    """Yield (id, Celery meta) for each of ``ids`` as its result becomes ready.

    Between polls, sleeps ``interval_s`` and calls ``between_polls(missing)``, where
    ``missing()`` reads and returns the ids still without a result. Raises
    TimeoutError after ``timeout`` seconds, having first read every still-pending id once
    more, so every result that did arrive has been yielded. A backend that cannot answer (a
    Redis restarting) is read again until then, and the TimeoutError is raised from its last
    error; one no wait mends (a certificate not trusted, a password refused) is raised at once.
    """
    poller = ResultPoller(backend, ids, window=window)
    deadline = None if timeout is None else time.monotonic() + timeout
    unreachable: Exception | None = None  # the result backend's error, while it lasts
    while poller.pending:
        try:
            read_again = poller.read_oldest()
            if unreachable is not None:
                log.warning("result backend reachable again")
                unreachable = None
        except BACKEND_ERRORS as exc:
            if _cannot_pass(exc):
                raise
            # A Redis restarting, say: the results are still to come; keep trying until the timeout.
            if unreachable is None:
                log.warning(
                    "cannot read results, retrying until the timeout: %s: %s", type(exc).__name__, exc
                )
            unreachable, read_again = exc, False
        yield from poller.take_arrived()
        if read_again or not poller.pending:
            continue
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            with contextlib.suppress(*BACKEND_ERRORS):
                poller.read_all()
            yield from poller.take_arrived()
            if poller.pending:
                message = f"{len(poller.pending)} result(s) still pending after {timeout:g} s"
                raise TimeoutError(message) from unreachable
            return
        if between_polls is not None:

            def missing() -> list[str]:
                # Ids past the window are unread and some may be ready: read them all first.
                # Called only when the hook needs the list (a redelivery, which is rare).
                poller.read_all()
                return list(poller.pending)

            with contextlib.suppress(*BACKEND_ERRORS):  # a redelivery check waits for the backend too
                between_polls(missing)
            yield from poller.take_arrived()
            if not poller.pending:
                return
        time.sleep(interval_s if deadline is None else min(interval_s, deadline - now))
