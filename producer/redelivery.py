"""Sending again the maps a Redis broker lost, while ``collect`` waits for them.

kombu's Redis transport takes a message off the queue (BRPOP) and only afterwards records
it as unacknowledged; a worker killed in between, or a Redis that restarts without having
persisted either step, loses the message for good (https://github.com/celery/kombu/issues/305).
Nothing on the broker side can tell. The producer can: it keeps the maps it packed, and it
knows which results are missing.

A map is sent again only when its result is missing and the broker holds no work at all —
its queue empty and no message unacknowledged — on two checks at least ``check_every_s``
apart. Then nothing can still produce that result: a map being rendered, waiting for a
retry or held by a worker is unacknowledged. Sending again is safe: the same object key,
the same bytes, and a success is never overwritten.

Packed maps are kept by result id until ``collect`` reads their result, up to ``max_bytes``
(the oldest dropped first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import redis

from producer.errors import BrokerError

log = logging.getLogger("actmap.producer")

# kombu's Redis transport keeps unacknowledged messages in this hash.
UNACKED_KEY = "unacked"


class Redelivery:
    """The packed maps kept, and the decision to send the missing ones again.

    ``send`` publishes a list of packed maps in one message; lost maps go out ``batch_size``
    to a message, as they were first sent, so they spread over the workers again.
    """

    def __init__(
        self,
        send: Callable[[Sequence[bytes]], None],
        broker_is_idle: Callable[[], bool],
        *,
        max_bytes: int,
        batch_size: int,
        check_every_s: float,
    ) -> None:
        self._send = send
        self._broker_is_idle = broker_is_idle
        self._max_bytes = max_bytes
        self._batch_size = batch_size
        self._check_every_s = check_every_s
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # keep runs in the publisher's thread, the rest in collect's
        self._last_check = 0.0
        self._idle_at_last_check = False
        self.redelivered = 0

    def keep(self, result_id: str, payload: bytes) -> None:
        """Hold a map as packed, until its result is collected."""
        with self._lock:
            old = self._payloads.pop(result_id, None)
            if old is not None:
                self._bytes -= len(old)
            self._payloads[result_id] = payload
            self._bytes += len(payload)
            while self._bytes > self._max_bytes and self._payloads:
                _, dropped = self._payloads.popitem(last=False)
                self._bytes -= len(dropped)

    def collected(self, result_ids: Iterable[str]) -> None:
        """Forget the maps whose results were read."""
        with self._lock:
            for result_id in result_ids:
                payload = self._payloads.pop(result_id, None)
                if payload is not None:
                    self._bytes -= len(payload)

    def check(self, missing: Callable[[], Iterable[str]]) -> int:
        """Call while waiting; sends again the missing maps if the broker stayed idle. Returns how many.

        ``missing()`` gives the result ids still without a result; it is called only then.
        """
        now = time.monotonic()
        if now - self._last_check < self._check_every_s:
            return 0
        self._last_check = now
        idle = self._broker_is_idle()
        confirmed = idle and self._idle_at_last_check
        self._idle_at_last_check = idle
        if not confirmed:
            return 0
        result_ids = list(missing())  # reads the result backend: not under the lock keep waits on
        with self._lock:
            lost = [self._payloads[rid] for rid in result_ids if rid in self._payloads]
        if not lost:
            return 0
        log.warning(
            "%d map(s) have no result and the broker holds no work: the broker lost them; sending them again",
            len(lost),
        )
        self._idle_at_last_check = False  # the broker has work again; look anew before another round
        sent = 0
        try:
            for start in range(0, len(lost), self._batch_size):
                batch = lost[start : start + self._batch_size]
                self._send(batch)
                sent += len(batch)
        except BrokerError as exc:  # they stay kept: a later check sends them
            log.warning("could not send lost maps again, will try at a later check: %s", exc)
        self.redelivered += sent
        return sent


class RedisBrokerIdleCheck:
    """Whether a Redis broker holds no message of ``queue``, queued or unacknowledged."""

    def __init__(self, broker_url: str, queue: str) -> None:
        self._broker_url = broker_url
        self._queue = queue
        self._client: redis.Redis | None = None

    def __call__(self) -> bool:
        try:
            if self._client is None:
                self._client = redis.Redis.from_url(
                    self._broker_url, socket_timeout=5, socket_connect_timeout=5
                )
            pipe = self._client.pipeline(transaction=False)
            pipe.llen(self._queue)
            pipe.hlen(UNACKED_KEY)
            queued, unacked = pipe.execute()
        except (redis.RedisError, OSError):
            return False  # cannot tell: do not send anything twice on a guess
        return bool(queued == 0 and unacked == 0)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
