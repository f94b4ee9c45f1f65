"""One map's way through a worker: decode → validate → render → store → result.

Plain Python, no Celery: the task in ``worker.tasks`` only feeds it messages, records
what it returns and schedules retries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from producer.errors import PermanentError, TransientError
from producer.keys import object_key, result_id
from producer.results import success_result
from producer.settings import Settings
from producer.wire import MapDecodeError, decode_map
from worker.render import render_png
from worker.storage import StorageLocation

log = logging.getLogger("actmap.worker")


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
class Retry:
    """Storage failed after boto3's own retries: send this map again later."""

    result_id: str
    payload: bytes
    error: TransientError


Outcome = Done | Failed | Retry


class Pipeline:
    def __init__(self, settings: Settings, location: StorageLocation) -> None:
        self.settings = settings
        self.location = location

    def process(self, payload: bytes) -> Outcome:
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
        fields = {"image_id": message.image_id, "map_name": message.name, "result_id": rid}
        try:
            png = render_png(
                message.array,
                message.colormap,
                message.fade_low_activation,
                compress_level=self.settings.png_compress_level,
            )
            rendered = time.perf_counter()
            key = object_key(self.location.prefix, message.image_id, message.name)
            stored = self.location.storage.put(key, png)
        except PermanentError as exc:
            log.warning("map %r failed: %s: %s", message.image_id, type(exc).__name__, exc, extra=fields)
            return Failed(rid, exc)
        except TransientError as exc:
            log.info("map %r will be retried: %s", message.image_id, exc, extra=fields)
            return Retry(rid, payload, exc)
        except Exception as exc:
            # A bug must cost one map, not the batch or the worker.
            log.exception("map %r failed unexpectedly", message.image_id, extra=fields)
            return Failed(rid, exc)
        finished = time.perf_counter()
        height, width = message.array.shape[:2]
        log.info(
            "map %r stored at %s (%d bytes, render %.1f ms, store %.1f ms)",
            message.image_id,
            stored.locator,
            stored.size,
            (rendered - started) * 1e3,
            (finished - rendered) * 1e3,
            extra=fields,
        )
        return Done(
            rid,
            success_result(
                image_id=message.image_id,
                name=message.name,
                locator=stored.locator,
                width=width,
                height=height,
                size=stored.size,
                checksum=stored.checksum,
            ),
        )
