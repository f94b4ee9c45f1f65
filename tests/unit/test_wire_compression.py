"""Map messages may travel zlib-compressed; the first byte tells, and inflating is bounded.

actmap's producer deflates with ISA-L (isal); the worker inflates any zlib stream, whatever wrote it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pytest
from isal import isal_zlib

from producer.wire import MapDecodeError, MapMessage, compress_map, decode_map, encode_map

LIMITS = {"max_pixels": 4096 * 4096, "max_message_bytes": 1 << 20}


def packed(array: np.ndarray) -> bytes:
    return encode_map(MapMessage("run", "img", None, array))


def gradcam_like(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    cam = np.exp(-((y - 0.4) ** 2 + (x - 0.6) ** 2) / 0.05) + 0.5 * np.exp(-((y - 0.8) ** 2 + x**2) / 0.02)
    return np.rint(cam / cam.max() * 255).astype(np.uint8)


def test_a_compressed_map_decodes_to_the_same_array_and_is_smaller_for_a_smooth_map() -> None:
    smooth = np.tile(np.arange(224, dtype=np.uint8), (224, 1))
    plain = packed(smooth)
    compressed = compress_map(plain, 1)
    assert compressed[:1] == b"\x78" and plain[:1] != b"\x78"
    assert len(compressed) < len(plain) / 4
    np.testing.assert_array_equal(decode_map(compressed, **LIMITS).array, smooth)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_each_isal_level_writes_a_standard_zlib_stream_that_plain_zlib_inflates(level: int) -> None:
    plain = packed(gradcam_like(96))
    compressed = compress_map(plain, level)
    assert compressed[:1] == b"\x78"
    assert zlib.decompress(compressed) == plain  # any consumer with plain zlib reads it
    np.testing.assert_array_equal(decode_map(compressed, **LIMITS).array, gradcam_like(96))


@pytest.mark.parametrize(
    "deflate",
    [
        pytest.param(lambda b: zlib.compress(b, 1), id="zlib-1"),
        pytest.param(lambda b: zlib.compress(b, 9), id="zlib-9"),
        pytest.param(lambda b: zlib.compress(b, 0), id="zlib-0-stored"),
        pytest.param(lambda b: isal_zlib.compress(b, 1), id="isal-1"),
        pytest.param(lambda b: compress_map(b, 1), id="compress_map-1"),
    ],
)
def test_a_map_deflated_by_plain_zlib_or_isal_decodes_the_same(deflate: Callable[[bytes], bytes]) -> None:
    array = gradcam_like(128)
    message = decode_map(deflate(packed(array)), **LIMITS)
    np.testing.assert_array_equal(message.array, array)
    assert (message.run_id, message.image_id, message.name) == ("run", "img", None)


def test_level_zero_sends_the_msgpack_bytes_as_they_are() -> None:
    plain = packed(np.zeros((4, 4), np.uint8))
    assert compress_map(plain, 0) is plain


@pytest.mark.parametrize("level", [-1, 4, 9, True, 1.0, None])
def test_a_wire_level_outside_0_to_3_is_refused_naming_the_range(level: object) -> None:
    with pytest.raises(ValueError, match=r"wire compress level is .*; expected an int from 0 \(off\) to 3"):
        compress_map(packed(np.zeros((4, 4), np.uint8)), level)  # type: ignore[arg-type]


def test_a_zlib_bomb_is_refused_without_inflating_it_whole() -> None:
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB of zeros in ~64 KB
    with pytest.raises(MapDecodeError, match=r"inflates to over 1048576 bytes"):
        decode_map(bomb, **LIMITS)


def _corrupted(stream: bytes, position: int) -> bytes:
    return stream[:position] + bytes([stream[position] ^ 0x01]) + stream[position + 1 :]


_GOOD = zlib.compress(packed(np.arange(64, dtype=np.uint8).reshape(8, 8)), 6)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\x78\x9c garbage", "not a valid zlib stream"),
        (compress_map(packed(np.zeros((8, 8), np.uint8)), 1)[:-6], "truncated zlib stream"),
        (_GOOD[:-6], "truncated zlib stream"),
        (b"\x78", "truncated zlib stream"),
        (_corrupted(_GOOD, len(_GOOD) - 1), "not a valid zlib stream"),  # the Adler-32 check
        (b"\x78\x00" + _GOOD[2:], "not a valid zlib stream"),  # the header check
        (b"\x78\xbb\x00\x00\x00\x01" + _GOOD[2:], "not a valid zlib stream"),  # needs a preset dictionary
        (zlib.compress(b"\xc1 not msgpack"), "not valid msgpack"),
    ],
)
def test_broken_compressed_messages_get_a_clear_error(payload: bytes, says: str) -> None:
    with pytest.raises(MapDecodeError, match=says):
        decode_map(payload, **LIMITS)
