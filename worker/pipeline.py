"""One map's way through a worker: decode → validate → render → store → result.

Plain Python, no Celery: the task in ``worker.tasks`` only feeds it messages, records
what it returns and schedules retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from producer.errors import MapDecodeError, PermanentError, TransientError
from producer.keys import object_key, result_id
from producer.results import success_result
from producer.settings import Settings
from producer.wire import decode_map
from worker import metrics
from worker.render import png_from_scanlines
from worker.storage import StorageLocation

log = logging.getLogger("actmap.worker")

# How long PUTs under way may keep process_batch waiting before it calls ``while_waiting``.
WAITING_S = 0.02


@dataclass(frozen=True)
class Done:
    result_id: str
    result: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    """A permanent failure; ``result_id`` is None when the message was too broken to say whose it was."""

    result_id: str | None
    error: Exception


@dataclass(frozen=True)
class RetryLater:
    """Storage failed after its client's own retries: send this map again later."""

    result_id: str
    payload: bytes
    error: TransientError


@dataclass(frozen=True)
class Postponed:
    """Not started: the message's time ran out. Sent on in a new message, not a retry."""

    payload: bytes


Outcome = Done | Failed | RetryLater | Postponed


@dataclass(frozen=True)
class _Rendered:
    """A map decoded and rendered, waiting for its PUT."""

    result_id: str
    payload: bytes
    image_id: str
    name: str | None
    key: str
    png: bytes
    width: int
    height: int
    render_ms: float


class Pipeline:
    """Renders maps one after another and stores them ``upload_threads`` at a time.

    A PUT is mostly waiting on the network: with threads the next map renders meanwhile,
    instead of the process idling for each upload. A local write is not: it is done in turn.
    """

    def __init__(self, settings: Settings, location: StorageLocation, upload_threads: int = 4) -> None:
        self.settings = settings
        self.location = location
        self._upload_threads = upload_threads
        # A log line costs more CPU than building the map's PNG: one per map only when asked for.
        self._stored_level = logging.INFO if settings.log_each_map else logging.DEBUG
        self._uploads = ThreadPoolExecutor(upload_threads, thread_name_prefix="actmap-upload")

    def process(self, payload: bytes) -> Outcome:
        """One map, start to end."""
        return next(iter(self.process_batch([payload])))

    def process_batch(
        self,
        payloads: Iterable[bytes],
        deadline: float | None = None,
        while_waiting: Callable[[], object] | None = None,
    ) -> Iterator[Outcome]:
        """Each map's outcome, as soon as it is known (not in the order given).

        No map is started after ``deadline`` (``time.monotonic()``): those come back Postponed.
        ``while_waiting`` is called when PUTs under way keep it waiting over ``WAITING_S``
        (the task sends the results it holds meanwhile, rather than after the slow PUT).
        """
        pending: set[Future[Outcome]] = set()
        for payload in payloads:
            # At most upload_threads PUTs under way: a map is started only when one can begin
            # its PUT, so the deadline bounds the PUTs too, not just the renders.
            while len(pending) >= self._upload_threads:
                finished, pending = _wait_for_one(pending, while_waiting)
                yield from (future.result() for future in finished)
            if deadline is not None and time.monotonic() > deadline:
                yield Postponed(payload)
                continue
            rendered = self._render(payload)
            if isinstance(rendered, Failed):
                yield rendered
            elif not self.location.storage.waits_on_network:
                yield self._store(rendered)
            else:
                pending.add(self._uploads.submit(self._store, rendered))
        while pending:
            finished, pending = _wait_for_one(pending, while_waiting)
            yield from (future.result() for future in finished)

    def _render(self, payload: bytes) -> _Rendered | Failed:
        started = time.perf_counter()
        try:
            message = decode_map(
                payload,
                max_pixels=self.settings.max_pixels,
                max_message_bytes=self.settings.max_message_bytes,
            )
        except MapDecodeError as exc:
            rid = result_id(*exc.identity) if exc.identity else None
            log.warning("map rejected: %s", exc, extra={"result_id": rid})
            return Failed(rid, exc)
        rid = result_id(message.run_id, message.image_id, message.name)
        try:
            png = png_from_scanlines(message.scanlines, message.colormap, message.fade_low_activation)
            key = object_key(self.location.prefix, message.image_id, message.name)
        except Exception as exc:
            return self._failed(rid, message.image_id, exc)
        height, width = message.scanlines.shape
        render_s = time.perf_counter() - started
        metrics.STAGE_SECONDS.labels("render").observe(render_s)
        render_ms = render_s * 1e3
        return _Rendered(rid, payload, message.image_id, message.name, key, png, width, height, render_ms)

    def _store(self, map_: _Rendered) -> Outcome:
        started = time.perf_counter()
        fields = {"image_id": map_.image_id, "map_name": map_.name, "result_id": map_.result_id}
        try:
            stored = self.location.storage.put(map_.key, map_.png)
        except TransientError as exc:
            log.info("map %r will be retried: %s", map_.image_id, exc, extra=fields)
            return RetryLater(map_.result_id, map_.payload, exc)
        except Exception as exc:
            return self._failed(map_.result_id, map_.image_id, exc)
        store_s = time.perf_counter() - started
        metrics.STAGE_SECONDS.labels("store").observe(store_s)
        log.log(
            self._stored_level,
            "map %r stored at %s (%d bytes, render %.1f ms, store %.1f ms)",
            map_.image_id,
            stored.locator,
            stored.size,
            map_.render_ms,
            store_s * 1e3,
            extra=fields,
        )
        return Done(
            map_.result_id,
            success_result(
                image_id=map_.image_id,
                name=map_.name,
                locator=stored.locator,
                width=map_.width,
                height=map_.height,
                size=stored.size,
                checksum=stored.checksum,
            ),
        )

    @staticmethod
    def _failed(rid: str, image_id: str, exc: Exception) -> Failed:
        fields = {"image_id": image_id, "result_id": rid}
        if isinstance(exc, PermanentError):
            log.warning("map %r failed: %s: %s", image_id, type(exc).__name__, exc, extra=fields)
        else:
            # A bug must cost one map, not the batch or the worker.
            log.error("map %r failed unexpectedly", image_id, exc_info=exc, extra=fields)
        return Failed(rid, exc)


def _wait_for_one(
    pending: set[Future[Outcome]], while_waiting: Callable[[], object] | None
) -> tuple[set[Future[Outcome]], set[Future[Outcome]]]:
    """(finished, still pending) once at least one of ``pending`` is done."""
    finished, still = wait(
        pending, timeout=None if while_waiting is None else WAITING_S, return_when=FIRST_COMPLETED
    )
    if not finished and while_waiting is not None:
        while_waiting()
        finished, still = wait(still, return_when=FIRST_COMPLETED)
    return finished, still
