"""Map messages may travel zlib-compressed; the first byte tells, and inflating is bounded."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from producer.wire import MapDecodeError, MapMessage, compress_map, decode_map, encode_map

LIMITS = {"max_pixels": 4096 * 4096, "max_message_bytes": 1 << 20}


def packed(array: np.ndarray) -> bytes:
    return encode_map(MapMessage("run", "img", None, array))


def test_a_compressed_map_decodes_to_the_same_array_and_is_smaller_for_a_smooth_map() -> None:
    smooth = np.tile(np.arange(224, dtype=np.uint8), (224, 1))
    plain = packed(smooth)
    compressed = compress_map(plain, 1)
    assert compressed[:1] == b"\x78" and plain[:1] != b"\x78"
    assert len(compressed) < len(plain) / 4
    np.testing.assert_array_equal(decode_map(compressed, **LIMITS).array, smooth)


def test_level_zero_sends_the_msgpack_bytes_as_they_are() -> None:
    plain = packed(np.zeros((4, 4), np.uint8))
    assert compress_map(plain, 0) is plain


def test_a_zlib_bomb_is_refused_without_inflating_it_whole() -> None:
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    with pytest.raises(MapDecodeError, match=r"inflates to over 1048576 bytes"):
        decode_map(bomb, **LIMITS)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\x78\x9c garbage", "not a valid zlib stream"),
        (compress_map(packed(np.zeros((8, 8), np.uint8)), 6)[:-6], "truncated zlib stream"),
        (zlib.compress(b"\xc1 not msgpack"), "not valid msgpack"),
    ],
)
def test_broken_compressed_messages_get_a_clear_error(payload: bytes, says: str) -> None:
    with pytest.raises(MapDecodeError, match=says):
        decode_map(payload, **LIMITS)
