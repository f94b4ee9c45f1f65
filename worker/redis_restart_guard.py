"""Keep a worker alive when Redis restarts under it (kombu 5.7's Redis transport).

When the connection drops, Celery closes the channel, and kombu then tries to hand the
worker's unacknowledged messages straight back to the queue — over the connection that is
gone. That raises (``'NoneType' object has no attribute 'hostname'``), Celery's handler does
not expect it, and the worker exits. Nothing needs handing back at that moment: those
messages are still recorded as unacknowledged in Redis, and the visibility sweep of the
reconnected workers redelivers them. So the failed hand-back is logged and left to the sweep.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("actmap.worker")


def install() -> None:
    from kombu.transport import redis as transport

    original = transport.QoS.restore_unacked
    if getattr(original, "actmap_guarded", False):
        return

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> None:
        try:
            original(self, client)
        except (AttributeError, RedisConnectionError, OSError) as exc:
            log.warning(
                "could not hand %d unacknowledged message(s) back to Redis now (%s: %s); "
                "the visibility sweep will redeliver them",
                len(self._delivered),
                type(exc).__name__,
                exc,
            )
            self._delivered.clear()

    restore_unacked.actmap_guarded = True  # type: ignore[attr-defined]
    transport.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]
