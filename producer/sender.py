"""Packing maps and publishing them, one Celery message per batch: what every publisher runs.

A ``MapSender`` runs wherever the maps are published: in the caller's thread (synchronous
submit), in the background publisher's thread, or in the publisher process. It keeps the
packed maps for ``producer.redelivery`` when the broker is Redis.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.celery_config import TASK_NAME
from producer.errors import BrokerError
from producer.keys import result_id
from producer.redelivery import UNACKED_KEY, KeptPayloads
from producer.settings import Settings
from producer.wire import MapMessage, pack_map

# What a publisher carries: a map submitted (packed when published) or one packed already
# (a map sent again by producer.redelivery).
Outgoing = MapMessage | bytes


class MapSender:
    """``resend`` is how maps lost by the broker go out again; None: keep no payloads for that."""

    def __init__(
        self, settings: Settings, app: Celery, *, resend: Callable[[list[bytes]], None] | None
    ) -> None:
        self.settings = settings
        self._app = app
        self._broker_client: redis.Redis | None = None
        # Only a Redis broker loses messages unseen (producer.redelivery).
        self.kept: KeptPayloads | None = None
        if resend is not None and settings.redeliver_lost and settings.uses_redis_broker():
            self.kept = KeptPayloads(
                resend, max_bytes=settings.redeliver_buffer_mb << 20, batch_size=settings.batch_size
            )

    def send(self, outgoing: Sequence[Outgoing]) -> None:
        """Pack and send maps in one Celery message; BrokerError once ``publish_timeout_s`` is spent."""
        payloads = [item if isinstance(item, bytes) else self._pack(item) for item in outgoing]
        timeout = self.settings.publish_timeout_s
        started = time.monotonic()
        try:
            self._app.send_task(
                TASK_NAME,
                args=[payloads],
                # What Flower and the logs show for the arguments; Celery's own repr of megabytes
                # of map bytes would cost more than the rest of the publish.
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
            # Its retries take about publish_timeout_s; a broker that accepts and never answers
            # takes the socket timeout too (at least 30 s): the time it really took is the one told.
            raise BrokerError(
                f"could not publish {len(payloads)} map(s) to {broker} in {time.monotonic() - started:.1f} s "
                f"(ACTMAP_PUBLISH_TIMEOUT_S {timeout:g}): {exc}"
            ) from exc

    def _pack(self, message: MapMessage) -> bytes:
        payload = pack_map(
            message,
            version=self.settings.wire_version,
            png_level=self.settings.png_compress_level,
            compress_level=self.settings.wire_compress_level,
        )
        if self.kept is not None:
            self.kept.remember(result_id(message.run_id, message.image_id, message.name), payload)
        return payload

    def broker_is_idle(self) -> bool:
        """Whether the Redis broker holds no message of our queue, queued or unacknowledged."""
        try:
            if self._broker_client is None:
                self._broker_client = redis.Redis.from_url(
                    self.settings.effective_broker_url, socket_timeout=5, socket_connect_timeout=5
                )
            pipe = self._broker_client.pipeline(transaction=False)
            pipe.llen(self.settings.queue)
            pipe.hlen(UNACKED_KEY)
            queued, unacked = pipe.execute()
        except (redis.RedisError, OSError):
            return False  # cannot tell: do not send anything twice on a guess
        return bool(queued == 0 and unacked == 0)

    def close(self) -> None:
        if self._broker_client is not None:
            self._broker_client.close()
