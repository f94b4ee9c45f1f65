"""Publishing off the caller's thread: a bounded buffer drained by one background thread.

``submit`` only validates and quantizes a map, then hands it to this buffer; the thread
packs, compresses and publishes them in batches — whatever is waiting, up to ``batch_size``
maps per Celery message — so the GPU loop never waits on the broker.

Guarantees: a map ``put`` here is published or reported. While the broker is unreachable
the thread keeps retrying; the buffer fills; once full, ``put`` blocks, and raises
BrokerError if no room appears within its timeout. ``flush`` waits until everything put so
far is published, or raises BrokerError saying how many maps are still unsent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from producer.errors import BrokerError

log = logging.getLogger("actmap.producer")

Item = TypeVar("Item")


# What either publisher (this thread, or producer.publisher_process) says when it cannot take or
# send maps: the same words, so callers and their tests see one API.
def closed_error() -> BrokerError:
    return BrokerError("producer is closed; create a new Producer to submit more maps")


def buffer_full_error(capacity: int, timeout_s: float, cause: object) -> BrokerError:
    return BrokerError(
        f"publish buffer full ({capacity} maps unsent for {timeout_s:g} s); {_why_unsent(cause)}"
    )


def unsent_error(unsent: int, timeout_s: float | None, kept_by: str, cause: object) -> BrokerError:
    return BrokerError(
        f"{unsent} map(s) still unsent after {timeout_s:g} s (kept {kept_by}, still publishing): "
        f"{_why_unsent(cause)}"
    )


def discarded_error(unsent: int, timeout_s: float | None, cause: object) -> BrokerError:
    """What close says of the maps it could not publish in time: closing gives them up."""
    return BrokerError(
        f"{unsent} map(s) still unsent after {timeout_s:g} s, discarded by close: {_why_unsent(cause)}"
    )


def _why_unsent(cause: object) -> str:
    """The last publish error, or, with none, a broker that takes maps slower than they come."""
    if cause is None:
        return "publishing is slower than maps are submitted"
    return f"the broker is not taking messages: {cause}"


class BackgroundPublisher(Generic[Item]):
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

    def wait_for_progress(self, seen: tuple[int, str | None], timeout_s: float) -> tuple[int, str | None]:
        """(maps published, last publish error) once they differ from ``seen``, or after ``timeout_s``."""
        with self._changed:
            self._changed.wait_for(lambda: self._progress() != seen, timeout=timeout_s)
            return self._progress()

    def _progress(self) -> tuple[int, str | None]:
        return self._published, None if self._last_error is None else str(self._last_error)

    def put(self, item: Item, timeout_s: float) -> None:
        """Buffer one map; blocks while the buffer is full, up to ``timeout_s``."""
        with self._changed:
            if self._closing:
                raise closed_error()
            if len(self._buffer) >= self._capacity and not self._changed.wait_for(
                lambda: len(self._buffer) < self._capacity, timeout=timeout_s
            ):
                raise buffer_full_error(self._capacity, timeout_s, self._last_error)
            self._buffer.append(item)
            # Wake the publisher only when it has something to do: the first map starts its
            # linger, a full batch ends it. Waking it on every map would make it contend for
            # the GIL with the caller's loop 200 times a second for nothing.
            if len(self._buffer) == 1 or len(self._buffer) >= self._batch_size:
                self._changed.notify_all()

    def flush(self, timeout_s: float | None) -> None:
        """Wait until every map put so far is published; BrokerError if ``timeout_s`` passes first."""
        with self._changed:
            target = self._published + len(self._buffer) + self._in_flight
            self._changed.notify_all()  # a put cut short by a Ctrl-C may have left the publisher asleep
            if not self._changed.wait_for(lambda: self._published >= target, timeout=timeout_s):
                unsent = target - self._published
                raise unsent_error(unsent, timeout_s, "in the buffer", self._last_error)

    def close(self, timeout_s: float | None) -> None:
        """Flush, then stop the thread. Maps still unsent after ``timeout_s`` are discarded: BrokerError."""
        try:
            self.flush(timeout_s)
        except BrokerError:
            raise discarded_error(self.unsent, timeout_s, self._last_error) from None
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
