"""Patches of kombu's Redis transport ``QoS`` that keep a worker alive when Redis restarts under it.

Written for kombu 5.7 and celery 5.7, the releases pyproject.toml allows. When the connection drops,
Celery closes the channel the worker's messages came on. kombu then reaches Redis through that
closed channel, where ``Channel._connparams`` raises an ``AttributeError`` that Celery's handlers do
not expect, and the worker exits (https://github.com/celery/kombu/issues/970 reports the
``restore_unacked`` one, met at shutdown). Each patch catches that failure, logs it and leaves the
message to the visibility sweep:

* ``QoS.restore_unacked``, run as the channel closes, hands the worker's unacknowledged messages
  back to the queue (``'NoneType' object has no attribute 'hostname'``).
* ``QoS.ack``: a task that was running meanwhile finishes and its message is acknowledged on the
  closed channel (``'NoneType' object has no attribute 'client'``); ``Message.ack_log_error`` only
  catches connection and channel errors.
* ``QoS.reject``: a pool process dies meanwhile and Celery requeues its message on the closed
  channel (the same error; ``Message.reject_log_error`` catches no more).

This is safe because those messages are still recorded as unacknowledged in Redis, and the visibility
sweep of the reconnected workers redelivers them: a finished task's maps are written again (same
keys, same bytes, and a success result is never overwritten by a failure). The ``ack`` and
``reject`` patches let an ``AttributeError`` through unless the channel's connection is gone.
tests/reliability/test_redis_restart_in_flight.py fails without any one of them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("actmap.worker")


def install() -> None:
    """Wrap kombu's Redis QoS; calling it again changes nothing."""
    from kombu.transport import redis as transport

    _wrap(transport.QoS, "restore_unacked", _guard_restore_unacked)
    _wrap(transport.QoS, "ack", _guard_settle("acknowledged"))
    _wrap(transport.QoS, "reject", _guard_settle("rejected"))


def _wrap(cls: Any, name: str, guard: Callable[[Any], Any]) -> None:
    original = getattr(cls, name)
    if getattr(original, "actmap_guarded", False):
        return
    guarded = functools.wraps(original)(guard(original))
    guarded.actmap_guarded = True  # type: ignore[attr-defined]
    setattr(cls, name, guarded)


def _guard_restore_unacked(original: Any) -> Callable[..., None]:
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

    return restore_unacked


def _guard_settle(done: str) -> Callable[[Any], Callable[..., None]]:
    """A guard for ``ack`` or ``reject`` (``done``: what the message would have been)."""

    def guard(original: Any) -> Callable[..., None]:
        def settle(self: Any, delivery_tag: str, *args: Any, **kwargs: Any) -> None:
            try:
                original(self, delivery_tag, *args, **kwargs)
            except AttributeError:
                # Only the closed channel's: kombu sets its connection to None on close. Anything
                # else is not ours to hide.
                if self.channel.connection is not None:
                    raise
                log.warning(
                    "message %s could not be %s: its connection closed when Redis went away; "
                    "the visibility sweep will redeliver it (its maps are then written again, "
                    "same bytes)",
                    delivery_tag,
                    done,
                )
                # What the base QoS would have dropped: nothing else will, on a closed channel.
                self._delivered.pop(delivery_tag, None)
                self._dirty.discard(delivery_tag)

        return settle

    return guard
