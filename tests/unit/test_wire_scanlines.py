"""Wire format version 2: a uint8 map as deflated PNG scanlines, from pack_map to the worker's PNG.

What the producer sends, what a foreign producer may send, what decode_map refuses (and how),
and that the PNG made from the scanlines as they came is the one render_png makes of the map.
"""

from __future__ import annotations

import io
import tracemalloc
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from producer.errors import PermanentError, WireFormatError
from producer.scanlines import FILTER_NONE, FILTER_SUB, Scanlines, sub_filtered, unfiltered
from producer.wire import (
    ARRAY_VERSION,
    SCANLINES_VERSION,
    MapDecodeError,
    MapMessage,
    decode_map,
    pack_map,
)
from tests.support.wire import decode_refusal, packed
from worker.render import colorize, png_from_scanlines, render_png

MAX_PIXELS = 512 * 512
MAX_MESSAGE_BYTES = 1 << 20
IDENTITY = ("run-1", "val/img-001", "cat")
V2_FIELDS = {"v", "run", "id", "name", "shape", "scanlines", "colormap", "fade"}
PNG_LEVELS = [0, 1, 2, 3]

Map = npt.NDArray[np.uint8]


# decode_map and its refusals under this file's limits (a test may pass others).
_decode = partial(decode_map, max_pixels=MAX_PIXELS, max_message_bytes=MAX_MESSAGE_BYTES)
_refusal = partial(decode_refusal, max_pixels=MAX_PIXELS, max_message_bytes=MAX_MESSAGE_BYTES)


def _scanlines_of(message: MapMessage) -> Scanlines:
    assert isinstance(message.array, Scanlines), type(message.array)
    return message.array


def _unpack(payload: bytes) -> dict[str, Any]:
    """The fields of a packed map message, inflating it first if it travels as a zlib stream."""
    fields = msgpack.unpackb(zlib.decompress(payload) if payload[:1] == b"\x78" else payload, raw=False)
    assert isinstance(fields, dict)
    return fields


def _png_rgba(png: bytes) -> Map:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGBA"))


def _random_map(height: int, width: int, seed: int = 0) -> Map:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def _gradient(height: int, width: int) -> Map:
    """A smooth Grad-CAM-like map: a Gaussian blob, peak 255."""
    y, x = np.mgrid[0:height, 0:width]
    cam = np.exp(-(((y - 0.4 * height) / height) ** 2 + ((x - 0.6 * width) / width) ** 2) / 0.05)
    intensities: Map = np.rint(cam / cam.max() * 255).astype(np.uint8)
    return intensities


MAPS = {
    "random-37x53": _random_map(37, 53),
    "gradient-64x96": _gradient(64, 96),
    "1x1": np.array([[200]], dtype=np.uint8),
    "1xN": _random_map(1, 300, seed=1),
    "Nx1": _random_map(300, 1, seed=2),
    "224x224": _gradient(224, 224),
    "wrapping-sub": np.tile(np.array([0, 255, 1, 254, 128, 0], dtype=np.uint8), (5, 3)),
}


def _filtered_rows(intensities: Map, filters: list[int]) -> bytes:
    """A foreign producer's scanlines: row r filtered with filters[r], 0 (None) or 1 (Sub)."""
    sub = sub_filtered(intensities)
    rows = np.empty_like(sub)
    for row, kind in enumerate(filters):
        rows[row, 0] = kind
        rows[row, 1:] = intensities[row] if kind == FILTER_NONE else sub[row, 1:]
    return rows.tobytes()


def _v2_fields(**changes: Any) -> dict[str, Any]:
    """A valid version 2 message's fields, as built by hand: the 3x4 map 0..11, Sub-filtered."""
    fields: dict[str, Any] = {
        "v": SCANLINES_VERSION,
        "run": "run-1",
        "id": "val/img-001",
        "name": "cat",
        "shape": [3, 4],
        "scanlines": zlib.compress(SMALL_ROWS, 9),
        "colormap": "jet",
        "fade": True,
    }
    fields.update(changes)
    return fields


SMALL_MAP: Map = np.arange(12, dtype=np.uint8).reshape(3, 4)
SMALL_ROWS = sub_filtered(SMALL_MAP).tobytes()
SMALL_NEEDS = "shape [3, 4] needs 3 rows of 1 + 4 bytes, 15"


def _assert_scanlines_refused(stream: bytes, says: str, shape: tuple[int, int] = (3, 4)) -> MapDecodeError:
    error = _refusal(packed(_v2_fields(scanlines=stream, shape=list(shape))))
    assert says in str(error)
    assert isinstance(error, WireFormatError)
    assert isinstance(error, PermanentError)
    assert error.identity == IDENTITY
    return error


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", PNG_LEVELS)
@pytest.mark.parametrize("key", list(MAPS))
def test_a_uint8_map_packed_as_version_2_decodes_to_scanlines_of_the_same_map(key: str, level: int) -> None:
    intensities = MAPS[key]
    message = MapMessage("run-1", "val/img-001", "cat", intensities, "viridis", False)

    payload = pack_map(message, version=2, png_level=level, compress_level=2)
    decoded = _decode(payload)

    scanlines = _scanlines_of(decoded)
    assert scanlines.shape == intensities.shape
    assert scanlines.intensities().dtype == np.uint8
    np.testing.assert_array_equal(scanlines.intensities(), intensities)
    assert (decoded.run_id, decoded.image_id, decoded.name) == IDENTITY
    assert (decoded.colormap, decoded.fade_low_activation) == ("viridis", False)


def test_an_unnamed_version_2_map_keeps_no_name_and_fade_on() -> None:
    message = MapMessage("r", "a/b", None, MAPS["1x1"])
    decoded = _decode(pack_map(message, version=2, png_level=1, compress_level=2))
    assert decoded.name is None
    assert (decoded.colormap, decoded.fade_low_activation) == ("jet", True)


def test_a_version_2_message_carries_exactly_the_documented_fields_and_any_zlib_inflates_them() -> None:
    intensities = MAPS["gradient-64x96"]
    payload = pack_map(MapMessage("r", "a", None, intensities), version=2, png_level=2, compress_level=2)

    assert payload[:1] != b"\x78", "version 2 is not deflated again as a whole"
    fields = _unpack(payload)
    assert set(fields) == V2_FIELDS
    assert fields["v"] == SCANLINES_VERSION
    assert fields["shape"] == [64, 96]
    assert isinstance(fields["scanlines"], bytes)
    # Plain zlib reads the stream: Sub-filtered rows, filter byte 1 then the differences.
    assert zlib.decompress(fields["scanlines"]) == sub_filtered(intensities).tobytes()


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda a: a[:, ::2], id="strided"),
        pytest.param(lambda a: a.T, id="transposed"),
        pytest.param(np.asfortranarray, id="fortran"),
        pytest.param(lambda a: a[::-1, 3:40], id="reversed-slice"),
    ],
)
def test_strided_and_fortran_ordered_uint8_maps_are_sent_in_c_order(
    view: Callable[[Map], Map],
) -> None:
    intensities = view(MAPS["random-37x53"])
    payload = pack_map(MapMessage("r", "a", None, intensities), version=2, png_level=1, compress_level=2)
    np.testing.assert_array_equal(_scanlines_of(_decode(payload)).intensities(), intensities)


# --- the worker's PNG -----------------------------------------------------------------------


@pytest.mark.parametrize("level", PNG_LEVELS)
@pytest.mark.parametrize("colormap", ["jet", "viridis", "gray", "turbo"])
@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("key", ["gradient-64x96", "random-37x53", "1x1"])
def test_the_png_from_version_2_scanlines_is_render_pngs_png_of_the_map(
    key: str, colormap: str, fade: bool, level: int
) -> None:
    # Given a map sent as version 2, its scanlines deflated at the level the worker would use...
    intensities = MAPS[key]
    message = MapMessage("run-1", "val/img-001", "cat", intensities, colormap, fade)
    decoded = _decode(pack_map(message, version=2, png_level=level, compress_level=2))

    # ...when the worker stores them as the IDAT, with no deflate of its own...
    png = png_from_scanlines(_scanlines_of(decoded), decoded.colormap, decoded.fade_low_activation)

    # ...the PNG is byte for byte render_png's, and decodes to colorize's RGBA.
    assert png == render_png(intensities, colormap, fade, compress_level=level)
    np.testing.assert_array_equal(_png_rgba(png), colorize(intensities, colormap, fade))


# --- which version pack_map sends -----------------------------------------------------------


@pytest.mark.parametrize("compress_level", [0, 2])
def test_version_1_is_sent_when_asked_for_even_for_a_uint8_map(compress_level: int) -> None:
    intensities = MAPS["random-37x53"]
    message = MapMessage("r", "a", "cat", intensities)

    payload = pack_map(message, version=1, png_level=1, compress_level=compress_level)

    assert (payload[:1] == b"\x78") == (compress_level > 0)
    fields = _unpack(payload)
    assert fields["v"] == ARRAY_VERSION
    assert "scanlines" not in fields
    assert (fields["dtype"], fields["shape"]) == ("uint8", [37, 53])
    decoded = _decode(payload)
    assert isinstance(decoded.array, np.ndarray)
    np.testing.assert_array_equal(decoded.array, intensities)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("compress_level", [0, 2])
def test_version_1_is_sent_for_a_float_map_even_when_version_2_is_asked_for(
    dtype: str, compress_level: int
) -> None:
    # Given a map that is not quantized (quantize off): floats, not uint8...
    array = np.linspace(0.0, 1.0, 6 * 7).reshape(6, 7).astype(dtype)

    payload = pack_map(
        MapMessage("r", "a", None, array), version=2, png_level=1, compress_level=compress_level
    )

    # ...it goes as version 1, with its own dtype and bytes.
    fields = _unpack(payload)
    assert fields["v"] == ARRAY_VERSION
    assert (fields["dtype"], fields["shape"]) == (dtype, [6, 7])
    decoded = _decode(payload)
    assert isinstance(decoded.array, np.ndarray)
    np.testing.assert_array_equal(decoded.array, array)


def test_a_uint8_map_with_one_channel_is_sent_as_version_2_of_shape_h_w() -> None:
    intensities = MAPS["gradient-64x96"]
    payload = pack_map(
        MapMessage("r", "a", None, intensities[:, :, np.newaxis]), version=2, png_level=1, compress_level=2
    )

    fields = _unpack(payload)
    assert fields["v"] == SCANLINES_VERSION
    assert fields["shape"] == [64, 96]
    np.testing.assert_array_equal(_scanlines_of(_decode(payload)).intensities(), intensities)


# --- foreign producers ----------------------------------------------------------------------


def _zlib_row_by_row(rows: bytes, row_bytes: int) -> bytes:
    """A streaming producer's deflate: each row compressed and sync-flushed, then finished."""
    deflater = zlib.compressobj(6)
    parts = []
    for start in range(0, len(rows), row_bytes):
        parts.append(deflater.compress(rows[start : start + row_bytes]))
        parts.append(deflater.flush(zlib.Z_SYNC_FLUSH))
    parts.append(deflater.flush())
    return b"".join(parts)


@pytest.mark.parametrize(
    "filters",
    [
        pytest.param("alternating", id="none-and-sub-alternating"),
        pytest.param("none", id="all-none"),
        pytest.param("random", id="random-none-or-sub"),
    ],
)
@pytest.mark.parametrize(
    "deflate",
    [
        pytest.param("zlib-9", id="zlib-9"),
        pytest.param("zlib-0", id="zlib-0-stored-blocks"),
        pytest.param("row-by-row", id="zlib-sync-flushed-per-row"),
    ],
)
@pytest.mark.parametrize("shape", [(300, 301), (5, 7), (1, 1)])
def test_a_version_2_message_built_by_hand_by_a_foreign_producer_decodes_and_renders(
    filters: str, deflate: str, shape: tuple[int, int]
) -> None:
    # Given the documented fields, with rows filtered None or Sub and deflated by plain zlib
    # (300x301 at level 0 is two stored blocks: one holds at most 65535 bytes)...
    height, width = shape
    noise: Map = _random_map(height, width, seed=3) & np.uint8(0x0F)
    intensities: Map = _gradient(height, width) ^ noise
    kinds = {
        "alternating": [row % 2 for row in range(height)],
        "none": [FILTER_NONE] * height,
        "random": [int(k) for k in np.random.default_rng(4).integers(0, 2, height)],
    }[filters]
    rows = _filtered_rows(intensities, kinds)
    stream = {
        "zlib-9": lambda: zlib.compress(rows, 9),
        "zlib-0": lambda: zlib.compress(rows, 0),
        "row-by-row": lambda: _zlib_row_by_row(rows, width + 1),
    }[deflate]()
    payload = packed(_v2_fields(shape=[height, width], scanlines=stream, colormap="magma", fade=False))

    # ...when the worker decodes it and makes its PNG...
    decoded = _decode(payload)
    scanlines = _scanlines_of(decoded)
    png = png_from_scanlines(scanlines, decoded.colormap, decoded.fade_low_activation)

    # ...the map is the producer's, and so is the picture.
    assert (decoded.run_id, decoded.image_id, decoded.name) == IDENTITY
    assert scanlines.stream == stream
    np.testing.assert_array_equal(scanlines.intensities(), intensities)
    np.testing.assert_array_equal(_png_rgba(png), colorize(intensities, "magma", False))


def test_a_version_2_message_sent_as_a_zlib_stream_as_a_whole_decodes() -> None:
    payload = zlib.compress(packed(_v2_fields()), 6)
    assert payload[:1] == b"\x78"
    np.testing.assert_array_equal(_scanlines_of(_decode(payload)).intensities(), SMALL_MAP)


@pytest.mark.parametrize("cinfo", range(8))
def test_a_zlib_header_declaring_any_window_zlib_allows_is_read_and_renders(cinfo: int) -> None:
    # CINFO (the high nibble) is log2(window) - 8: up to 7, a 32 KiB window. The map is
    # smaller than the smallest window, 256 bytes, so every one of these streams is valid.
    stream = _with_zlib_window(zlib.compress(SMALL_ROWS, 9), cinfo)
    assert zlib.decompress(stream) == SMALL_ROWS
    decoded = _decode(packed(_v2_fields(scanlines=stream)))
    png = png_from_scanlines(_scanlines_of(decoded), "jet", True)
    np.testing.assert_array_equal(_png_rgba(png), colorize(SMALL_MAP, "jet", True))


def _with_zlib_window(stream: bytes, cinfo: int) -> bytes:
    """The stream with its header's CINFO replaced and FCHECK fixed (no preset dictionary)."""
    cmf = cinfo << 4 | 8  # deflate
    flg = -(cmf << 8) % 31  # under 31: FDICT (0x20) stays clear
    return bytes([cmf, flg]) + stream[2:]


@pytest.mark.parametrize("cinfo", range(8, 16))
def test_scanlines_whose_zlib_header_declares_a_window_png_forbids_are_refused(cinfo: int) -> None:
    # Given a stream whose header declares a window zlib does not allow (RFC 1950: CINFO <= 7),
    # which ISA-L would inflate but zlib, libpng and Pillow refuse...
    stream = _with_zlib_window(zlib.compress(SMALL_ROWS, 9), cinfo)
    with pytest.raises(zlib.error, match="invalid window size"):
        zlib.decompress(stream)
    # ...it is refused, not stored as an IDAT no PNG reader opens
    _assert_scanlines_refused(stream, f"(header CMF 0x{stream[0]:02x}: a window over 32 KiB); expected")


# --- refusals: the stream -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "inflated"),
    [
        pytest.param(SMALL_ROWS[:-1], 14, id="one-byte-short"),
        pytest.param(SMALL_ROWS[:-5], 10, id="one-row-short"),
        pytest.param(b"", 0, id="empty"),
    ],
)
def test_scanlines_inflating_to_fewer_bytes_than_the_shape_needs_are_refused(
    rows: bytes, inflated: int
) -> None:
    _assert_scanlines_refused(zlib.compress(rows, 9), f"inflate to {inflated} bytes; {SMALL_NEEDS}")


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(SMALL_ROWS + b"\x00", id="one-byte-more"),
        pytest.param(SMALL_ROWS + SMALL_ROWS[:5], id="one-row-more"),
        pytest.param(SMALL_ROWS * 2, id="twice"),
    ],
)
def test_scanlines_inflating_to_more_bytes_than_the_shape_needs_are_refused(rows: bytes) -> None:
    _assert_scanlines_refused(zlib.compress(rows, 9), f"inflate to over 15 bytes; {SMALL_NEEDS}")


def test_a_scanlines_bomb_is_refused_without_inflating_it_whole() -> None:
    # Given a 512x512 map's scanlines, 262,656 bytes, as 100 times that many zeros deflated (~25 KB)...
    height, width = 512, 512
    needed = height * (width + 1)
    bomb = zlib.compress(bytes(100 * needed), 9)
    assert len(bomb) < needed / 10
    payload = packed(_v2_fields(shape=[height, width], scanlines=bomb))
    _decode(packed(_v2_fields()))  # a first decode's one-off allocations are not the bomb's

    # ...when it is decoded...
    tracemalloc.start()
    try:
        with pytest.raises(MapDecodeError) as info:
            _decode(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # ...it is refused having inflated little more than the map needs, not 26 MB.
    assert f"inflate to over {needed} bytes; shape [512, 512] needs 512 rows of 1 + 512 bytes" in str(
        info.value
    )
    assert info.value.identity == IDENTITY
    assert peak < 2 * needed + (128 << 10), f"decoding the bomb allocated {peak} bytes at its peak"


def test_scanlines_cut_short_at_any_length_are_refused() -> None:
    stream = zlib.compress(SMALL_ROWS, 9)
    for length in range(len(stream)):
        with pytest.raises(MapDecodeError):
            _decode(packed(_v2_fields(scanlines=stream[:length])))
    _assert_scanlines_refused(stream[:-4], "truncated zlib stream (15 bytes inflated)")  # no Adler-32
    _assert_scanlines_refused(stream[: len(stream) // 2], "truncated zlib stream")
    _assert_scanlines_refused(b"", f"truncated zlib stream (0 bytes inflated); {SMALL_NEEDS}")


@pytest.mark.parametrize(
    ("after", "count"),
    [
        pytest.param(b"\x00", 1, id="one-zero"),
        pytest.param(b"garbage!", 8, id="garbage"),
        pytest.param(zlib.compress(SMALL_ROWS, 9), len(zlib.compress(SMALL_ROWS, 9)), id="a-second-stream"),
    ],
)
def test_bytes_after_the_end_of_the_zlib_stream_are_refused_counting_them(after: bytes, count: int) -> None:
    stream = zlib.compress(SMALL_ROWS, 9) + after
    _assert_scanlines_refused(stream, f"have {count} bytes after their zlib stream; expected none")


def _raw_deflate(data: bytes, wbits: int) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return deflater.compress(data) + deflater.flush()


def _with_preset_dictionary(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zdict=b"\x01\x02\x03\x04" * 8)
    return deflater.compress(data) + deflater.flush()


def _corrupted(stream: bytes, position: int) -> bytes:
    return stream[:position] + bytes([stream[position] ^ 0x01]) + stream[position + 1 :]


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"hello, scanlines", id="text"),
        pytest.param(b"\x78\x9c garbage", id="zlib-header-then-garbage"),
        pytest.param(SMALL_ROWS, id="the-rows-not-deflated"),
        pytest.param(_raw_deflate(SMALL_ROWS, -15), id="raw-deflate"),
        pytest.param(_raw_deflate(SMALL_ROWS, 31), id="gzip"),
        pytest.param(b"\x78\x00" + zlib.compress(SMALL_ROWS)[2:], id="bad-header-check"),
        pytest.param(
            _corrupted(zlib.compress(SMALL_ROWS), len(zlib.compress(SMALL_ROWS)) - 1), id="adler-32"
        ),
        pytest.param(_with_preset_dictionary(SMALL_ROWS), id="preset-dictionary"),
    ],
)
def test_scanlines_that_are_not_a_zlib_stream_are_refused(stream: bytes) -> None:
    _assert_scanlines_refused(stream, "map scanlines are not a valid zlib stream (")


def test_a_stream_needing_a_preset_dictionary_is_refused_even_though_zlib_with_it_reads_it() -> None:
    stream = _with_preset_dictionary(SMALL_ROWS)
    inflater = zlib.decompressobj(zdict=b"\x01\x02\x03\x04" * 8)
    assert inflater.decompress(stream) == SMALL_ROWS  # valid, but not for a PNG, which has no dictionary
    _assert_scanlines_refused(stream, "not a valid zlib stream")


@pytest.mark.parametrize("kind", [2, 3, 4, 5, 128, 255])
@pytest.mark.parametrize("row", [0, 1, 2])
def test_a_filter_type_other_than_none_or_sub_is_refused_naming_the_row_and_type(kind: int, row: int) -> None:
    rows = bytearray(_filtered_rows(SMALL_MAP, [FILTER_NONE, FILTER_SUB, FILTER_NONE]))
    rows[row * 5] = kind
    _assert_scanlines_refused(
        zlib.compress(bytes(rows), 9),
        f"map scanline {row} has filter type {kind}; expected 0 (None) or 1 (Sub)",
    )


def test_of_several_rows_with_unknown_filter_types_the_first_is_named() -> None:
    rows = bytearray(SMALL_ROWS)
    rows[1 * 5], rows[2 * 5] = 4, 2
    _assert_scanlines_refused(zlib.compress(bytes(rows)), "map scanline 1 has filter type 4")


# --- refusals: the fields -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[3, 4, 1], [3], [3, 4, 1, 1]])
def test_a_version_2_shape_other_than_h_w_is_refused(shape: list[int]) -> None:
    error = _refusal(packed(_v2_fields(shape=shape)))
    assert f"map shape of a version 2 message must be [h, w], received {shape!r}" in str(error)
    assert error.identity == IDENTITY


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ("3x4", "shape must be [h, w] or [h, w, 1] of ints, received '3x4'"),
        (None, "shape must be [h, w] or [h, w, 1] of ints, received None"),
        ([3.0, 4], "shape must be [h, w] or [h, w, 1] of ints"),
        ([True, 4], "shape must be [h, w] or [h, w, 1] of ints"),
        ([0, 4], "is empty; expected h, w >= 1"),
        ([3, -4], "is empty; expected h, w >= 1"),
    ],
)
def test_a_version_2_shape_that_is_not_two_positive_ints_is_refused(shape: object, words: str) -> None:
    error = _refusal(packed(_v2_fields(shape=shape)))
    assert words in str(error)
    assert error.identity == IDENTITY


def test_a_version_2_message_missing_its_scanlines_is_refused_naming_them() -> None:
    fields = _v2_fields()
    del fields["scanlines"]
    error = _refusal(packed(fields))
    assert "map message lacks field(s) scanlines" in str(error)
    assert error.identity == IDENTITY


def test_a_version_2_message_with_version_1_data_instead_of_scanlines_is_refused() -> None:
    fields = _v2_fields(dtype="uint8", data=SMALL_MAP.tobytes())
    del fields["scanlines"]
    assert "lacks field(s) scanlines" in str(_refusal(packed(fields)))


def test_a_version_1_message_with_scanlines_instead_of_dtype_and_data_is_refused() -> None:
    assert "lacks field(s) data, dtype" in str(_refusal(packed(_v2_fields(v=1))))


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (zlib.compress(SMALL_ROWS).decode("latin-1"), "str"),
        (list(zlib.compress(SMALL_ROWS)), "list"),
        (None, "NoneType"),
        (15, "int"),
    ],
)
def test_scanlines_that_are_not_bytes_are_refused_naming_the_type(value: object, kind: str) -> None:
    error = _refusal(packed(_v2_fields(scanlines=value)))
    assert f"map field 'scanlines' must be bytes, received {kind}" in str(error)
    assert error.identity == IDENTITY


def test_a_version_2_map_of_exactly_max_pixels_is_read_and_one_more_row_is_refused() -> None:
    tall = SMALL_MAP.reshape(4, 3)
    at_limit = packed(_v2_fields(shape=[4, 3], scanlines=zlib.compress(sub_filtered(tall).tobytes())))
    np.testing.assert_array_equal(_scanlines_of(_decode(at_limit, max_pixels=12)).intensities(), tall)

    error = _refusal(packed(_v2_fields(shape=[5, 3])), max_pixels=12)
    assert "map shape [5, 3] has 15 pixels; expected at most 12" in str(error)
    assert error.identity == IDENTITY


def test_a_huge_version_2_shape_is_refused_before_its_scanlines_are_inflated() -> None:
    bomb = zlib.compress(bytes(64 << 20), 9)
    payload = packed(_v2_fields(shape=[100_000, 100_000], scanlines=bomb))
    tracemalloc.start()
    try:
        error = _refusal(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"has {100_000 * 100_000} pixels; expected at most {MAX_PIXELS}" in str(error)
    assert peak < len(payload) + (1 << 20)


@pytest.mark.parametrize("version", [3, 0, "2", 2.0, True])
def test_a_message_of_an_unknown_version_is_refused_saying_which_are_read(version: object) -> None:
    error = _refusal(packed(_v2_fields(v=version)))
    assert f"map message version is {version!r}; this worker reads versions 1 and 2" in str(error)
    assert error.identity == IDENTITY


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(database=None, deadline=None, max_examples=400)
SMALL_SHAPES = st.tuples(st.integers(1, 8), st.integers(1, 8))


def _decode_or_refuse(stream: bytes, shape: tuple[int, int]) -> None:
    """Decode; a refusal must be a MapDecodeError, and a success must match the declared shape."""
    try:
        decoded = _decode(packed(_v2_fields(shape=list(shape), scanlines=stream)), max_pixels=64)
    except MapDecodeError as exc:
        assert isinstance(exc, PermanentError)
        assert exc.identity == IDENTITY
        return
    scanlines = _scanlines_of(decoded)
    assert scanlines.stream == stream
    assert scanlines.shape == shape
    assert set(scanlines.rows[:, 0].tolist()) <= {FILTER_NONE, FILTER_SUB}
    assert scanlines.intensities().shape == shape


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    """A valid stream of a small random map, then a few bytes flipped, cut, inserted or deleted."""
    height, width = draw(SMALL_SHAPES)
    body = draw(st.binary(min_size=height * width, max_size=height * width))
    intensities = np.frombuffer(body, dtype=np.uint8).reshape(height, width)
    kinds = draw(st.lists(st.sampled_from([0, 1, 1, 2, 255]), min_size=height, max_size=height))
    rows = bytearray(_filtered_rows(intensities, [min(k, 1) for k in kinds]))
    rows[:: width + 1] = bytes(kinds)
    stream = bytearray(zlib.compress(bytes(rows), draw(st.sampled_from([0, 1, 9]))))
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(stream) - 1)) if stream else 0
        operation = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        if operation == "flip" and stream:
            stream[index] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del stream[index:]
        elif operation == "insert":
            stream[index:index] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "delete":
            del stream[index : index + draw(st.integers(1, 4))]
    shape = draw(st.just((height, width)) | SMALL_SHAPES)
    return bytes(stream), shape


@FUZZ
@given(
    stream=st.binary(max_size=200) | st.binary(max_size=200).map(lambda tail: b"\x78\x9c" + tail),
    shape=SMALL_SHAPES,
)
def test_arbitrary_scanlines_bytes_are_decoded_to_their_shape_or_refused_with_a_map_decode_error(
    stream: bytes, shape: tuple[int, int]
) -> None:
    _decode_or_refuse(stream, shape)


@FUZZ
@given(case=mutated_streams())
def test_mutated_valid_scanlines_are_decoded_to_their_shape_or_refused_with_a_map_decode_error(
    case: tuple[bytes, tuple[int, int]],
) -> None:
    _decode_or_refuse(*case)


# --- the filters ----------------------------------------------------------------------------

UINT8_MAPS = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40))


@settings(database=None, deadline=None, max_examples=300)
@given(intensities=UINT8_MAPS)
def test_unfiltering_sub_filtered_scanlines_gives_back_the_map(intensities: Map) -> None:
    rows = sub_filtered(intensities)
    assert rows.shape == (intensities.shape[0], intensities.shape[1] + 1)
    assert rows.dtype == np.uint8
    np.testing.assert_array_equal(unfiltered(rows), intensities)


@settings(database=None, deadline=None, max_examples=300)
@given(intensities=UINT8_MAPS)
def test_sub_filtered_rows_are_filter_byte_1_then_each_byte_minus_its_left_neighbour(
    intensities: Map,
) -> None:
    rows = sub_filtered(intensities)
    # PNG's Sub, written out per row: the first byte as it is, then differences mod 256.
    expected = np.empty_like(rows)
    expected[:, 0] = FILTER_SUB
    expected[:, 1] = intensities[:, 0]
    expected[:, 2:] = (intensities[:, 1:].astype(np.int16) - intensities[:, :-1]) % 256
    np.testing.assert_array_equal(rows, expected)


@settings(database=None, deadline=None, max_examples=200)
@given(
    shape=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    seed=st.integers(0, 2**32 - 1),
)
def test_unfiltering_rows_of_none_and_sub_mixed_gives_back_the_map(shape: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    intensities = rng.integers(0, 256, size=shape, dtype=np.uint8)
    kinds = [int(k) for k in rng.integers(0, 2, shape[0])]
    rows = np.frombuffer(_filtered_rows(intensities, kinds), dtype=np.uint8).reshape(shape[0], shape[1] + 1)
    np.testing.assert_array_equal(unfiltered(rows), intensities)
    assert rows.flags.writeable is False  # read-only, as decode_map's rows are: unfiltered copies


@pytest.mark.parametrize(
    ("keyword", "words"), [("png_level", "PNG compress level"), ("compress_level", "wire")]
)
@pytest.mark.parametrize("level", [-1, 4, 9, True, 1.0, "1"])
def test_pack_map_refuses_a_level_isal_does_not_have_naming_the_range(
    keyword: str, words: str, level: object
) -> None:
    levels: dict[str, Any] = {"png_level": 1, "compress_level": 2, keyword: level}
    with pytest.raises(ValueError, match=rf"{words} .*is {level!r}; expected an int from 0.* to 3 \(ISA-L\)"):
        pack_map(MapMessage("run-1", "val/img-001", "cat", SMALL_MAP), version=2, **levels)
