"""worker.render: bit-exact with Kolena's colorize_activation_map, and a palette PNG that decodes to it."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from producer.errors import InvalidMapError
from worker.colormaps import lut
from worker.render import colorize, render_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def decode_png_rgba(png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGBA"))


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks, checking each CRC."""
    assert png[:8] == PNG_SIGNATURE
    chunks = []
    position = 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        chunks.append((kind, data))
        position += 12 + length
    assert position == len(png)
    return chunks


def smooth_map(height: int, width: int, seed: int) -> npt.NDArray[np.float64]:
    """A Grad-CAM-like map: a few Gaussian blobs, scaled so its peak is exactly 1."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    cam = np.zeros((height, width))
    for _ in range(3):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.1, 0.4) * max(height, width)
        cam += rng.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    cam -= cam.min()
    scaled: npt.NDArray[np.float64] = cam / cam.max()
    return scaled


def kolena_test_map(dtype: type, seed: int) -> npt.NDArray[Any]:
    """A 48x48 map in ``dtype``: smooth blobs, plus 0, 1 and values either side of each (k + 0.5) / 255."""
    k = np.arange(255, dtype=np.float64)
    boundaries: npt.NDArray[Any] = ((k + 0.5) / 255).astype(dtype)
    special = np.concatenate(
        [
            np.array([0.0, 1.0], dtype=dtype),
            boundaries,
            np.nextafter(boundaries, dtype(0)),
            np.nextafter(boundaries, dtype(1)),
        ]
    )
    if dtype is np.float16:
        # Values where rounding in float16 and in float64 disagree: the dtype must be honoured.
        all_half = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)
        disagree = np.rint(all_half * np.float16(255)) != np.rint(all_half.astype(np.float64) * 255)
        special = np.concatenate([special, all_half[disagree]])
    flat: npt.NDArray[Any] = smooth_map(48, 48, seed).astype(dtype).ravel()
    flat[: special.size] = special
    return flat.reshape(48, 48)


def kolena_colorize(activation_map: npt.NDArray[Any], fade: bool) -> npt.NDArray[np.uint8]:
    visualization = pytest.importorskip("kolena.workflow.visualization")
    colormap = visualization.ColormapJet(fade_low_activation=fade)
    result: npt.NDArray[np.uint8] = visualization.colorize_activation_map(activation_map.copy(), colormap)
    return result


@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_uint8_maps_of_all_256_values_colorize_exactly_like_kolena(
    fade: bool, shape: tuple[int, ...]
) -> None:
    activation_map = np.arange(256, dtype=np.uint8)[::-1].reshape(shape)
    np.testing.assert_array_equal(
        colorize(activation_map, "jet", fade), kolena_colorize(activation_map, fade)
    )


@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float_maps_colorize_exactly_like_kolena(dtype: type, fade: bool) -> None:
    activation_map = kolena_test_map(dtype, seed=np.dtype(dtype).itemsize)
    np.testing.assert_array_equal(
        colorize(activation_map, "jet", fade), kolena_colorize(activation_map, fade)
    )


def test_float16_maps_colorize_exactly_like_kolena_in_single_channel_form() -> None:
    activation_map = kolena_test_map(np.float16, seed=11)[:24, :24, np.newaxis]
    np.testing.assert_array_equal(colorize(activation_map), kolena_colorize(activation_map, True))


def test_colorize_returns_a_fresh_writable_rgba_array() -> None:
    activation_map = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgba = colorize(activation_map)
    assert rgba.shape == (3, 4, 4)
    assert rgba.dtype == np.uint8
    assert rgba.flags.c_contiguous
    assert rgba.flags.writeable
    assert not np.shares_memory(rgba, lut("jet", True))
    np.testing.assert_array_equal(rgba, lut("jet", True)[activation_map])


def test_png_is_an_8_bit_palette_image_with_a_full_plte_and_a_trns_chunk() -> None:
    chunks = png_chunks(render_png(smooth_map(30, 50, seed=1).astype(np.float32)))
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    assert kinds.index(b"PLTE") < kinds.index(b"tRNS") < kinds.index(b"IDAT")
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height) == (50, 30)
    assert (bit_depth, colour_type, interlace) == (8, 3, 0)
    data = dict(chunks)
    table = lut("jet", True)
    assert data[b"PLTE"] == table[:, :3].tobytes()
    assert len(data[b"PLTE"]) == 768
    assert data[b"tRNS"] == table[:, 3].tobytes()


def test_png_has_a_trns_chunk_even_when_fade_is_off_and_every_entry_is_opaque() -> None:
    data = dict(png_chunks(render_png(np.zeros((2, 2), dtype=np.uint8), fade_low_activation=False)))
    assert data[b"tRNS"] == b"\xff" * 256


def test_png_pixel_indices_are_the_intensities() -> None:
    activation_map = np.arange(256, dtype=np.uint8).reshape(8, 32)
    with Image.open(io.BytesIO(render_png(activation_map))) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.asarray(image), activation_map)


@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_png_decodes_to_the_colorized_map_at_its_own_size(dtype: type, fade: bool) -> None:
    activation_map: npt.NDArray[Any] = smooth_map(37, 61, seed=5).astype(dtype)
    decoded = decode_png_rgba(render_png(activation_map, "jet", fade))
    assert decoded.shape == (37, 61, 4)
    np.testing.assert_array_equal(decoded, colorize(activation_map, "jet", fade))


def test_png_of_a_kolena_test_map_decodes_to_kolenas_colorization() -> None:
    activation_map = kolena_test_map(np.float32, seed=3)[:24]
    decoded = decode_png_rgba(render_png(activation_map))
    np.testing.assert_array_equal(decoded, kolena_colorize(activation_map, True))


def test_single_channel_and_strided_maps_render_like_their_2d_contiguous_form() -> None:
    base = np.arange(240, dtype=np.uint8).reshape(12, 20)
    expected = render_png(base)
    assert render_png(base[:, :, np.newaxis]) == expected
    assert render_png(np.asfortranarray(base)) == expected
    assert decode_png_rgba(render_png(base[:, ::3])).tolist() == colorize(base[:, ::3]).tolist()


def test_read_only_maps_decoded_from_a_wire_buffer_render_without_being_written() -> None:
    activation_map = np.frombuffer(bytes(range(256)), dtype=np.uint8).reshape(16, 16)
    assert not activation_map.flags.writeable
    np.testing.assert_array_equal(decode_png_rgba(render_png(activation_map)), colorize(activation_map))
    assert activation_map.tobytes() == bytes(range(256))


def test_compress_level_changes_the_size_but_not_the_pixels() -> None:
    activation_map = smooth_map(64, 64, seed=2).astype(np.float32)
    pngs = {level: render_png(activation_map, compress_level=level) for level in (0, 1, 2, 3)}
    assert len(pngs[0]) > len(pngs[1])
    expected = colorize(activation_map)
    for png in pngs.values():
        np.testing.assert_array_equal(decode_png_rgba(png), expected)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_the_idat_is_a_standard_zlib_stream_at_each_isal_level(level: int) -> None:
    # ISA-L deflates the scanlines: plain zlib must inflate them to the Sub-filtered rows of the
    # map, and Pillow must decode the PNG to colorize()'s RGBA.
    activation_map = smooth_map(45, 70, seed=4).astype(np.float32)
    png = render_png(activation_map, compress_level=level)
    idat = b"".join(data for kind, data in png_chunks(png) if kind == b"IDAT")
    assert idat[:1] == b"\x78"
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(45, 71)
    assert (rows[:, 0] == 1).all()  # filter type Sub on every row
    indices = np.cumsum(rows[:, 1:], axis=1, dtype=np.uint8)  # undo Sub, mod 256
    np.testing.assert_array_equal(indices, np.rint(activation_map * np.float32(255)).astype(np.uint8))
    np.testing.assert_array_equal(decode_png_rgba(png), colorize(activation_map))


def test_the_default_level_is_the_settings_default() -> None:
    # The worker renders at Settings().png_compress_level; tests compare its objects with render_png(map).
    from producer.settings import Settings

    activation_map = smooth_map(40, 40, seed=6).astype(np.float32)
    level = Settings.model_fields["png_compress_level"].default
    assert render_png(activation_map) == render_png(activation_map, compress_level=level)


@pytest.mark.parametrize("level", [-1, 4, 9, 6.0, True, None])
def test_a_compress_level_outside_0_to_3_is_a_programming_error(level: object) -> None:
    with pytest.raises(ValueError, match=r"compress_level is .*; expected an int from 0 to 3"):
        render_png(np.zeros((2, 2), dtype=np.uint8), compress_level=level)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None, database=None)
@given(
    activation_map=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=24)),
    fade=st.booleans(),
)
def test_any_uint8_map_decodes_from_png_to_exactly_its_colorization(
    activation_map: npt.NDArray[np.uint8], fade: bool
) -> None:
    decoded = decode_png_rgba(render_png(activation_map, "jet", fade))
    np.testing.assert_array_equal(decoded, colorize(activation_map, "jet", fade))


BAD_MAPS = [
    pytest.param(np.zeros((4, 4, 3), dtype=np.uint8), "3 channels", id="three-channels"),
    pytest.param(np.zeros((4, 4), dtype=np.int32), "dtype int32", id="int32"),
    pytest.param(np.zeros((0, 4), dtype=np.uint8), "empty", id="empty"),
    pytest.param(np.full((2, 2), np.nan, dtype=np.float32), "4 NaN", id="nan"),
    pytest.param(np.full((2, 2), 2.0), "max 2.0", id="above-one"),
]


@pytest.mark.parametrize(("activation_map", "received"), BAD_MAPS)
@pytest.mark.parametrize("render", [colorize, render_png])
def test_bad_maps_are_refused_by_colorize_and_render_png(
    render: Any, activation_map: npt.NDArray[Any], received: str
) -> None:
    with pytest.raises(InvalidMapError, match=received):
        render(activation_map)


@pytest.mark.parametrize("render", [colorize, render_png])
def test_unknown_colormaps_are_refused_by_colorize_and_render_png(render: Any) -> None:
    with pytest.raises(InvalidMapError, match="unknown colormap 'cividis'"):
        render(np.zeros((2, 2), dtype=np.uint8), "cividis")


def test_importing_render_loads_neither_celery_nor_boto3_nor_redis() -> None:
    code = (
        "import sys, worker.render; "
        "loaded = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(loaded & {'celery', 'boto3', 'botocore', 'redis', 'kombu'}))"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
