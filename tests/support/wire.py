"""Helpers the wire-format tests share: decoding under a test's own limits, and raw msgpack."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from producer.errors import MapDecodeError
from producer.wire import decode_map


def decode_refusal(payload: object, *, max_pixels: int, max_message_bytes: int) -> MapDecodeError:
    """The MapDecodeError decode_map raises for ``payload``; fails the test if it decodes."""
    with pytest.raises(MapDecodeError) as info:
        decode_map(payload, max_pixels=max_pixels, max_message_bytes=max_message_bytes)
    return info.value


def packed(value: Any) -> bytes:
    """``value`` as msgpack, binary-safe, as a producer of map messages packs it."""
    return msgpack.packb(value, use_bin_type=True)
