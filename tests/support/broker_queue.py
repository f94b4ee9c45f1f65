"""Reading what the producer left in a Redis broker's queue, without a worker."""

from __future__ import annotations

import base64
import json

import msgpack
import redis

from producer.wire import decode_map


def queued_batches(client: redis.Redis, queue: str) -> list[list[str]]:
    """The image ids of each message in the queue, oldest first (kombu's envelope, msgpack body)."""
    batches = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes: the oldest is last
        envelope = json.loads(raw)
        args, _kwargs, _embed = msgpack.unpackb(base64.b64decode(envelope["body"]))
        batches.append(
            [decode_map(p, max_pixels=1 << 24, max_message_bytes=1 << 26).image_id for p in args[0]]
        )
    return batches
