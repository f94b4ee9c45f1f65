"""producer.intensity.batch_to_intensities on numpy batches: to_intensities of each map, in one operation."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from producer.errors import InvalidMapError
from producer.intensity import batch_to_intensities, to_intensities

DTYPES = ["uint8", "float16", "float32", "float64"]


def _batch(dtype: str, count: int = 6, shape: tuple[int, int] = (24, 40), seed: int = 0) -> npt.NDArray[Any]:
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    values = rng.random((count, *shape))
    values[0, 0, :4] = [0.0, 1.0, 0.5 / 255, 1.5 / 255]  # the ends, and ties that round to even
    return values.astype(dtype)


def _message(maps: object, **kwargs: Any) -> str:
    with pytest.raises(InvalidMapError) as info:
        batch_to_intensities(maps, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_quantizes_bit_for_bit_like_to_intensities_of_each_map(dtype: str) -> None:
    maps = _batch(dtype)
    out = batch_to_intensities(maps)
    assert out.dtype == np.uint8 and out.shape == maps.shape and out.flags.c_contiguous
    for cam, row in zip(maps, out, strict=True):
        np.testing.assert_array_equal(row, to_intensities(cam))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_with_a_channel_axis_gives_the_same_intensities(dtype: str) -> None:
    maps = _batch(dtype)
    np.testing.assert_array_equal(batch_to_intensities(maps[:, None]), batch_to_intensities(maps))


def test_every_float16_value_in_the_unit_interval_matches_to_intensities() -> None:
    values = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).reshape(1, 1, -1)
    maps = np.concatenate([values, values[:, :, ::-1]])
    out = batch_to_intensities(maps)
    np.testing.assert_array_equal(out[0], to_intensities(values[0]))
    np.testing.assert_array_equal(out[1], to_intensities(values[0, :, ::-1]))


def test_a_contiguous_uint8_batch_is_returned_without_a_copy() -> None:
    maps = _batch("uint8")
    assert batch_to_intensities(maps) is maps


def test_a_strided_batch_is_made_c_contiguous() -> None:
    maps = np.asfortranarray(_batch("float32"))
    out = batch_to_intensities(maps)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, batch_to_intensities(np.ascontiguousarray(maps)))


@pytest.mark.parametrize("index", [0, 3, 5])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_first_map_out_of_range_is_refused_naming_its_index_and_submits_reason(
    index: int, dtype: str
) -> None:
    maps = _batch(dtype)
    maps[index, 2, 3] = 1.5
    if index < 5:
        maps[5, 0, 0] = np.nan  # a later bad map is not the one named
    message = _message(maps)
    with pytest.raises(InvalidMapError) as alone:
        to_intensities(maps[index])
    assert message == f"map {index} of the batch: {alone.value}"
    assert f"({dtype}) has values from min" in message and "max 1.5" in message


def test_a_bad_map_is_named_by_its_image_id_when_the_ids_are_given() -> None:
    maps = _batch("float32", count=3)
    maps[1, 0, 0] = np.inf
    message = _message(maps, image_ids=["a", "b", "c"])
    assert message == (
        "map 1 of the batch (image id 'b'): activation map (float32, 960 pixels) has 0 NaN and "
        "1 infinite values; expected finite values in [0, 1]"
    )


@pytest.mark.parametrize(
    ("shape", "received"),
    [
        ((4, 8, 8, 3), "(4, 8, 8, 3): 3 channels"),
        ((8, 8), "(8, 8): 2 dimensions"),
        ((8,), "(8,): 1 dimension"),
        ((2, 1, 8, 8, 1), "(2, 1, 8, 8, 1): 5 dimensions"),
    ],
)
def test_batches_of_other_shapes_are_refused_naming_the_shape(shape: tuple[int, ...], received: str) -> None:
    assert _message(np.zeros(shape, np.float32)) == (
        f"batch of activation maps has shape {received}; expected (B, H, W) or (B, 1, H, W)"
    )


def test_batches_of_other_dtypes_are_refused_as_maps_are() -> None:
    assert _message(np.zeros((2, 4, 4), np.int64)) == (
        "activation map has dtype int64; expected uint8, or float16/float32/float64 with values in [0, 1]"
    )


def test_batches_of_maps_over_max_pixels_or_empty_maps_are_refused() -> None:
    assert "expected at most 99 (max_pixels)" in _message(np.zeros((2, 10, 10), np.uint8), max_pixels=99)
    assert "activation map is empty" in _message(np.zeros((2, 0, 10), np.float32))


def test_an_empty_batch_gives_no_intensities() -> None:
    assert batch_to_intensities(np.zeros((0, 4, 5), np.float32)).shape == (0, 4, 5)


def test_a_batch_is_not_modified() -> None:
    maps = _batch("float32")
    before = maps.copy()
    batch_to_intensities(maps)
    np.testing.assert_array_equal(maps, before)
