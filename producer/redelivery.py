"""Sending again the maps a Redis broker lost, while ``collect`` waits for them.

kombu's Redis transport takes a message off the queue (BRPOP) and only afterwards records
it as unacknowledged; a worker killed in between, or a Redis that restarts without having
persisted either step, loses the message for good (celery/kombu#305). Nothing on the
broker side can tell. The producer can: it still has the maps it packed, and it knows which
results are missing.

A map is sent again only when its result is missing and the broker holds no work at all —
its queue empty and no message unacknowledged — on two checks at least ``check_every_s``
apart. Then nothing can still produce that result: a map being rendered, waiting for a
retry or held by a worker is unacknowledged. Sending again is safe: the same object key,
the same bytes, and a success is never overwritten.

Payloads are kept until their result is collected, up to ``max_bytes`` (oldest dropped),
by whatever packs them (the publisher thread, or the publisher process), and dropped as
``collect`` reads their results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

log = logging.getLogger("actmap.producer")

# kombu's Redis transport keeps unacknowledged messages in this hash.
UNACKED_KEY = "unacked"


class KeptPayloads:
    """The packed maps, by result id, until their result is collected; at most ``max_bytes``.

    Sent again ``batch_size`` to a message, as they were first: thousands lost at once in one
    message would go to one worker process, one after the other.
    """

    def __init__(self, send: Callable[[list[bytes]], None], *, max_bytes: int, batch_size: int) -> None:
        self._send = send
        self._max_bytes = max_bytes
        self._batch_size = batch_size
        self._payloads: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # remember runs in the publisher thread, the rest in collect's
        self._bytes = 0

    def remember(self, result_id: str, payload: bytes) -> None:
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
        with self._lock:
            for result_id in result_ids:
                payload = self._payloads.pop(result_id, None)
                if payload is not None:
                    self._bytes -= len(payload)

    def resend(self, result_ids: Iterable[str]) -> int:
        """Send again the kept maps among ``result_ids``; returns how many."""
        with self._lock:
            lost = [self._payloads[rid] for rid in result_ids if rid in self._payloads]
        if lost:
            log.warning(
                "%d map(s) have no result and the broker holds no work: the broker lost them; "
                "sending them again",
                len(lost),
            )
            for start in range(0, len(lost), self._batch_size):
                self._send(lost[start : start + self._batch_size])
        return len(lost)


class LostMapRedelivery:
    """Decides when maps are lost: their result missing, the broker idle on two checks in a row."""

    def __init__(
        self,
        resend: Callable[[list[str]], int],
        broker_is_idle: Callable[[], bool],
        *,
        check_every_s: float,
    ) -> None:
        self._resend = resend
        self._broker_is_idle = broker_is_idle
        self._check_every_s = check_every_s
        self._last_check = 0.0
        self._idle_since_check = False
        self.redelivered = 0

    def check(self, missing: Callable[[], Iterable[str]]) -> int:
        """Call while waiting; sends again the missing maps if the broker stayed idle. Returns how many.

        ``missing()`` gives the result ids still without a result; it is called only then.
        """
        now = time.monotonic()
        if now - self._last_check < self._check_every_s:
            return 0
        self._last_check = now
        idle = self._broker_is_idle()
        confirmed = idle and self._idle_since_check
        self._idle_since_check = idle
        if not confirmed:
            return 0
        sent = self._resend(list(missing()))
        if sent:
            self.redelivered += sent
            self._idle_since_check = False  # the broker has work again; look anew before another round
        return sent
