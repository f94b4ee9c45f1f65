"""Publishing maps: one Celery message per batch, sent from the caller's thread or a background one.

``submit`` only validates and quantizes a map, then hands it to a ``BackgroundPublisher``;
its thread packs and publishes what is waiting — up to ``batch_size`` maps per Celery
message — so the GPU loop never waits on the broker. ``BrokerSender`` is the publish itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.celery_config import TASK_NAME
from producer.errors import BrokerError
from producer.settings import Settings

log = logging.getLogger("actmap.producer")

Item = TypeVar("Item")


class BrokerSender:
    """Sends packed map messages to the workers' queue, one Celery message per call."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self._app = app

    def send(self, payloads: Sequence[bytes]) -> None:
        """Publish ``payloads`` in one message; BrokerError once ``publish_timeout_s`` is spent."""
        timeout = self.settings.publish_timeout_s
        started = time.monotonic()
        try:
            self._app.send_task(
                TASK_NAME,
                args=[list(payloads)],
                # What Flower and the logs show for the arguments, rather than megabytes of map bytes.
                argsrepr=f"[<{len(payloads)} map message(s)>]",
                kwargsrepr="{}",
                queue=self.settings.queue,
                ignore_result=True,  # results are per map, stored by the worker under their own ids
                retry=True,
                # About one attempt a second for publish_timeout_s (kombu bounds retries by count).
                retry_policy={
                    "max_retries": max(1, math.ceil(timeout)),
                    "interval_start": 0,
                    "interval_step": 0.5,
                    "interval_max": 1,
                },
            )
        except (OperationalError, OSError) as exc:
            broker = maybe_sanitize_url(self.settings.effective_broker_url)
            # A broker that accepts and never answers takes the socket timeout too: say how long it took.
            raise BrokerError(
                f"could not publish {len(payloads)} map(s) to {broker} in {time.monotonic() - started:.1f} s "
                f"(ACTMAP_PUBLISH_TIMEOUT_S {timeout:g}): {exc}"
            ) from exc


def _why_unsent(cause: object) -> str:
    """The last publish error, or, with none, a broker that takes maps slower than they come."""
    if cause is None:
        return "publishing is slower than maps are submitted"
    return f"the broker is not taking messages: {cause}"


class BackgroundPublisher(Generic[Item]):
    """A bounded buffer of maps, drained by one thread that sends them ``batch_size`` at a time.

    A map ``put`` here is published or reported. While the broker is unreachable the thread
    keeps retrying and the buffer fills; once full, ``put`` blocks, and raises BrokerError if
    no room appears within its timeout. ``flush`` waits until everything put so far is
    published, or raises BrokerError saying how many maps are still unsent.
    """

    def __init__(
        self, send: Callable[[Sequence[Item]], None], *, capacity: int, batch_size: int, linger_s: float
    ) -> None:
        self._send = send
        self._capacity = capacity
        self._batch_size = batch_size
        self._linger_s = linger_s
        self._buffer: deque[Item] = deque()
        self._changed = threading.Condition()
        # Maps taken from the buffer by the publisher and not yet published. What is unsent is
        # counted from the buffer itself, not by put: a Ctrl-C cannot come between a map and its count.
        self._in_flight = 0
        self._published = 0  # maps the broker has taken so far
        self._last_error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="actmap-publisher", daemon=True)
        self._thread.start()

    @property
    def unsent(self) -> int:
        """Maps accepted but not yet taken by the broker."""
        with self._changed:
            return len(self._buffer) + self._in_flight

    def put(self, item: Item, timeout_s: float) -> None:
        """Buffer one map; blocks while the buffer is full, up to ``timeout_s``."""
        with self._changed:
            if self._closing:
                raise BrokerError("producer is closed; create a new Producer to submit more maps")
            if len(self._buffer) >= self._capacity and not self._changed.wait_for(
                lambda: len(self._buffer) < self._capacity, timeout=timeout_s
            ):
                raise BrokerError(
                    f"publish buffer full ({self._capacity} maps unsent for {timeout_s:g} s); "
                    f"{_why_unsent(self._last_error)}"
                )
            self._buffer.append(item)
            # Wake the publisher only when it has something to do: the first map starts its
            # linger, a full batch ends it; waking it on every map would only make it contend
            # with the caller's loop for the GIL.
            if len(self._buffer) == 1 or len(self._buffer) >= self._batch_size:
                self._changed.notify_all()

    def flush(self, timeout_s: float | None) -> None:
        """Wait until every map put so far is published; BrokerError if ``timeout_s`` passes first."""
        with self._changed:
            target = self._published + len(self._buffer) + self._in_flight
            self._changed.notify_all()  # a put cut short by a Ctrl-C may have left the publisher asleep
            if not self._changed.wait_for(lambda: self._published >= target, timeout=timeout_s):
                unsent = target - self._published
                raise BrokerError(
                    f"{unsent} map(s) still unsent after {timeout_s:g} s (kept in the buffer, still "
                    f"publishing): {_why_unsent(self._last_error)}"
                )

    def close(self, timeout_s: float | None) -> None:
        """Flush, then stop the thread. Maps still unsent after ``timeout_s`` are discarded: BrokerError."""
        try:
            self.flush(timeout_s)
        except BrokerError:
            raise BrokerError(
                f"{self.unsent} map(s) still unsent after {timeout_s:g} s, discarded by close: "
                f"{_why_unsent(self._last_error)}"
            ) from None
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._send(batch)
            except Exception as exc:  # keep the maps: nothing accepted may be dropped
                self._requeue(batch, exc)
                time.sleep(0.5)
                continue
            with self._changed:
                self._published += len(batch)
                self._in_flight = 0
                if self._last_error is not None:
                    log.warning("broker reachable again; publishing resumed")
                    self._last_error = None
                self._changed.notify_all()

    def _next_batch(self) -> list[Item] | None:
        with self._changed:
            # Not only woken by put: a put cut short by a Ctrl-C may not have, hence the timeout.
            while not (self._buffer or self._closing):
                self._changed.wait(timeout=1.0)
            if not self._buffer:
                return None  # closing, and nothing left
            if len(self._buffer) < self._batch_size and self._linger_s > 0 and not self._closing:
                # A moment's wait lets a busy loop's next maps join this message.
                self._changed.wait_for(
                    lambda: len(self._buffer) >= self._batch_size or self._closing, timeout=self._linger_s
                )
            count = min(self._batch_size, len(self._buffer))
            batch = [self._buffer.popleft() for _ in range(count)]
            self._in_flight = count
            self._changed.notify_all()  # room in the buffer for a blocked put
            return batch

    def _requeue(self, batch: list[Item], error: Exception) -> None:
        with self._changed:
            if self._last_error is None:
                log.warning("cannot publish %d map(s), will keep retrying: %s", len(batch), error)
            self._last_error = error
            self._buffer.extendleft(reversed(batch))
            self._in_flight = 0
            self._changed.notify_all()
