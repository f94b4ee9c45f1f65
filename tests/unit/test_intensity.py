"""producer.intensity: what maps are accepted, how floats become uint8, and what each refusal says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from producer.errors import InvalidMapError
from producer.intensity import to_intensities

FLOAT_DTYPES = [np.float16, np.float32, np.float64]


def _all_float16_in_unit_interval() -> npt.NDArray[np.float16]:
    # float16 bit patterns 0x0000..0x3C00 are exactly the values 0.0..1.0 in increasing order.
    return np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)


def _message(activation_map: object, **kwargs: Any) -> str:
    with pytest.raises(InvalidMapError) as info:
        to_intensities(activation_map, **kwargs)
    return str(info.value)


def test_contiguous_2d_uint8_maps_are_returned_as_the_same_array() -> None:
    activation_map = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_intensities(activation_map) is activation_map


def test_single_channel_uint8_maps_are_squeezed_without_a_copy() -> None:
    activation_map = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    out = to_intensities(activation_map)
    assert out.shape == (3, 4)
    assert out.flags.c_contiguous
    assert np.shares_memory(out, activation_map)
    np.testing.assert_array_equal(out, activation_map[:, :, 0])


def test_channel_first_uint8_maps_are_squeezed_without_a_copy() -> None:
    activation_map = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    out = to_intensities(activation_map)
    assert out.shape == (3, 4)
    assert np.shares_memory(out, activation_map)
    np.testing.assert_array_equal(out, activation_map[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_channel_first_float_maps_quantize_like_their_plane(dtype: type) -> None:
    plane = np.random.default_rng(3).random((5, 7)).astype(dtype)
    np.testing.assert_array_equal(to_intensities(plane[None]), to_intensities(plane))


def test_a_one_by_n_by_one_map_is_read_as_channels_last_a_single_row() -> None:
    activation_map = np.arange(5, dtype=np.uint8).reshape(1, 5, 1)
    assert to_intensities(activation_map).shape == (1, 5)


def test_read_only_uint8_maps_from_a_wire_buffer_are_accepted_without_a_copy() -> None:
    activation_map = np.frombuffer(bytes(range(12)), dtype=np.uint8).reshape(3, 4)
    out = to_intensities(activation_map)
    assert np.shares_memory(out, activation_map)
    assert out.tolist() == activation_map.tolist()


def test_strided_uint8_maps_are_made_c_contiguous() -> None:
    base = np.arange(48, dtype=np.uint8).reshape(6, 8)
    for activation_map in (base[:, ::2], base.T, np.asfortranarray(base)):
        out = to_intensities(activation_map)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, activation_map)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_float_maps_are_quantized_as_rint_of_255_times_the_value_in_their_own_dtype(dtype: type) -> None:
    rng = np.random.default_rng(7)
    k = np.arange(255, dtype=np.float64)
    boundaries: npt.NDArray[Any] = ((k + 0.5) / 255).astype(dtype)
    values = np.concatenate(
        [
            rng.random(1031).astype(dtype),
            boundaries,
            np.nextafter(boundaries, dtype(0)),
            np.nextafter(boundaries, dtype(1)),
            np.array([0.0, 1.0, -0.0, 0.5], dtype=dtype),
        ]
    ).reshape(40, 45)
    out = to_intensities(values)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.rint(values * dtype(255)).astype(np.uint8))


def test_float16_maps_round_in_float16_not_in_float64() -> None:
    values = _all_float16_in_unit_interval()
    out = to_intensities(values.reshape(1, -1))[0]
    np.testing.assert_array_equal(out, np.rint(values * np.float16(255)).astype(np.uint8))
    # The two precisions really disagree on some values, so the test above has teeth.
    in_float64 = np.rint(values.astype(np.float64) * 255).astype(np.uint8)
    assert np.count_nonzero(out != in_float64) > 0


def test_float16_table_lookup_agrees_with_float16_arithmetic_on_every_value() -> None:
    values = _all_float16_in_unit_interval().reshape(1, -1)
    # Big-endian and negative-zero maps skip the lookup table and take the arithmetic path.
    swapped = values.astype(values.dtype.newbyteorder(">"))
    with_negative_zero = np.concatenate([values, [[-0.0]]], axis=1).astype(np.float16)
    np.testing.assert_array_equal(to_intensities(swapped), to_intensities(values))
    np.testing.assert_array_equal(to_intensities(with_negative_zero)[:, :-1], to_intensities(values))
    assert to_intensities(with_negative_zero)[0, -1] == 0


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4", "<f8", ">f8"])
def test_float_maps_of_either_byte_order_are_accepted(dtype: str) -> None:
    activation_map = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=dtype)
    assert to_intensities(activation_map).tolist() == [[0, 64, 128, 255]]


def test_exact_edge_values_map_to_0_and_255() -> None:
    for dtype in FLOAT_DTYPES:
        out = to_intensities(np.array([[0.0, 1.0]], dtype=dtype))
        assert out.tolist() == [[0, 255]]


def test_fortran_ordered_float_maps_give_c_contiguous_intensities() -> None:
    activation_map = np.asfortranarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4))
    out = to_intensities(activation_map)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.rint(activation_map * np.float32(255)).astype(np.uint8))


def test_float_inputs_are_never_modified() -> None:
    activation_map = np.linspace(0, 1, 12).reshape(3, 4)
    before = activation_map.copy()
    to_intensities(activation_map)
    np.testing.assert_array_equal(activation_map, before)


def test_nested_lists_of_floats_are_accepted_as_float64_maps() -> None:
    assert to_intensities([[0.0, 0.5], [1.0, 0.25]]).tolist() == [[0, 128], [255, 64]]


@settings(max_examples=60, deadline=None, database=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(FLOAT_DTYPES),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, max_side=8),
        elements={"min_value": 0.0, "max_value": 1.0},
    )
)
def test_any_float_map_in_the_unit_interval_quantizes_like_rint(activation_map: npt.NDArray[Any]) -> None:
    expected = np.rint(activation_map * activation_map.dtype.type(255)).astype(np.uint8)
    np.testing.assert_array_equal(to_intensities(activation_map), expected)


@pytest.mark.parametrize("dtype", ["int8", "int32", "int64", "uint16", "bool", "complex64", "object", "U3"])
def test_other_dtypes_are_refused_naming_the_dtype_received_and_expected(dtype: str) -> None:
    message = _message(np.zeros((4, 4), dtype=dtype))
    assert f"dtype {np.dtype(dtype)}" in message
    assert "expected uint8, or float16/float32/float64 with values in [0, 1]" in message


def test_long_double_maps_are_refused() -> None:
    if np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is float64 on this platform")
    assert "float128" in _message(np.zeros((2, 2), dtype=np.longdouble))


def test_lists_of_ints_are_refused_naming_the_source_type() -> None:
    message = _message([[0, 255], [3, 4]])
    assert "dtype int64 (converted from list)" in message
    assert "expected uint8" in message


def test_ragged_lists_are_refused_as_not_convertible() -> None:
    message = _message([[0.1, 0.2], [0.3]])
    assert "type list is not convertible" in message
    assert "(h, w), (h, w, 1) or (1, h, w)" in message


def test_three_channel_maps_are_refused_naming_shape_and_channels() -> None:
    message = _message(np.zeros((224, 224, 3), dtype=np.uint8))
    assert "shape (224, 224, 3): 3 channels" in message
    assert "expected (h, w), (h, w, 1) or (1, h, w)" in message


def test_channel_first_three_channel_maps_are_refused_naming_three_channels() -> None:
    message = _message(np.zeros((3, 224, 224), dtype=np.float32))
    assert "shape (3, 224, 224): 3 channels" in message
    assert "expected (h, w), (h, w, 1) or (1, h, w)" in message


@pytest.mark.parametrize(
    ("shape", "received"),
    [((10,), "(10,): 1 dimension"), ((2, 3, 1, 1), "(2, 3, 1, 1): 4 dimensions"), ((), "(): 0 dimensions")],
)
def test_maps_that_are_not_2d_are_refused_naming_their_dimensions(
    shape: tuple[int, ...], received: str
) -> None:
    message = _message(np.zeros(shape, dtype=np.float32))
    assert received in message
    assert "expected (h, w), (h, w, 1) or (1, h, w)" in message


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0, 1)])
def test_empty_maps_are_refused(shape: tuple[int, ...]) -> None:
    message = _message(np.zeros(shape, dtype=np.uint8))
    assert "empty" in message
    assert "0 pixels" in message
    assert "expected at least 1 pixel" in message


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_and_inf_are_refused_with_their_counts(dtype: type) -> None:
    activation_map: npt.NDArray[Any] = np.full((4, 4), 0.5, dtype=dtype)
    activation_map[0, :2] = np.nan
    activation_map[1, 1] = np.inf
    activation_map[2, 2] = -np.inf
    message = _message(activation_map)
    assert "2 NaN and 2 infinite values" in message
    assert "expected finite values in [0, 1]" in message


def test_a_single_nan_is_refused_even_where_min_and_max_look_valid() -> None:
    activation_map = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    activation_map[3, 3] = np.nan
    assert "1 NaN and 0 infinite values" in _message(activation_map)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_floats_outside_the_unit_interval_are_refused_with_min_and_max(dtype: type) -> None:
    activation_map: npt.NDArray[Any] = np.array([[-0.5, 0.25], [1.25, 0.75]], dtype=dtype)
    message = _message(activation_map)
    assert "min -0.5" in message
    assert "max 1.25" in message
    assert "expected values in [0, 1]" in message


def test_a_float_just_above_one_is_refused_and_its_value_shown_in_full() -> None:
    activation_map = np.array([[np.nextafter(np.float32(1), np.float32(2))]], dtype=np.float32)
    assert "max 1.0000001" in _message(activation_map)


def test_maps_over_max_pixels_are_refused_with_both_numbers() -> None:
    activation_map = np.zeros((100, 100), dtype=np.uint8)
    message = _message(activation_map, max_pixels=9999)
    assert "10000 pixels (100 x 100)" in message
    assert "expected at most 9999" in message
    assert to_intensities(activation_map, max_pixels=10000) is activation_map


def test_importing_intensity_loads_neither_pillow_nor_boto3_nor_celery() -> None:
    code = (
        "import sys, producer.intensity; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'PIL', 'boto3', 'botocore', 'celery'}))"
    )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
