"""producer.intensity on arrays of other libraries: checked with their own library, bit for bit like numpy.

torch tensors, JAX arrays and array-api-strict arrays (the array API standard and nothing more,
so the generic path uses no function a compliant library may lack). All live in host memory here,
where numpy reads them without a copy and quantizes them ("host" below). A map in GPU memory is
quantized with its own library before it crosses to the host; with no GPU here, each test also runs
that path on these arrays ("device": the same code, told the array is on a device).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_strict as strict
import jax.numpy as jnp
import numpy as np
import pytest

from producer.errors import InvalidMapError
from producer.intensity import (
    _batch_intensities,
    _in_device_memory,
    _library,
    _library_intensities,
    batch_to_intensities,
    to_intensities,
)

try:  # optional: scripts/test.sh installs the CPU build where it lies on disk
    import torch
except ImportError:
    torch = None


def host_copy(array: Any) -> np.ndarray:
    """The values of an array of another library, copied to the host as they are."""
    library = _library(array)
    assert library is not None
    return np.asarray(library.to_host(library.array))


@dataclass(frozen=True)
class Library:
    name: str
    from_numpy: Callable[[np.ndarray], Any]
    floats: tuple[str, ...]  # the float dtypes it holds as given (JAX: float64 only with x64 on)
    others: tuple[str, ...]  # dtypes a map may not have
    type_name: str  # as error messages name the converted type

    def __str__(self) -> str:
        return self.name


LIBRARIES = [
    Library("jax", jnp.asarray, ("float16", "float32"), ("int32", "bool", "int8"), "ArrayImpl"),
    Library("array-api-strict", strict.asarray, ("float32", "float64"), ("int64", "bool", "int8"), "Array"),
]
if torch is not None:
    LIBRARIES.append(
        Library(
            "torch",
            lambda a: torch.from_numpy(a.copy()),
            ("float16", "float32", "float64"),
            ("int64", "int32", "bool", "int8"),
            "Tensor",
        )
    )
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (optional: pip install torch)")
FLOATS = [(library, dtype) for library in LIBRARIES for dtype in library.floats]


def _on_device(activation_map: object, max_pixels: int | None = None) -> np.ndarray:
    out = _library_intensities(activation_map, max_pixels, on_device=True)
    assert out is not None, f"{type(activation_map).__name__} not recognised as an array library's"
    return out


PATHS = {"host": to_intensities, "device": _on_device}


@pytest.fixture(params=PATHS, ids=str)
def quantize(request: pytest.FixtureRequest) -> Callable[..., np.ndarray]:
    return PATHS[request.param]  # type: ignore[return-value]


def _message(activation_map: object, quantize: Callable[..., Any] = to_intensities, **kwargs: Any) -> str:
    with pytest.raises(InvalidMapError) as info:
        quantize(activation_map, **kwargs)
    return str(info.value)


def _smooth(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.random((size, size))
    values[0, 0], values[0, 1] = 0.0, 1.0
    # exact half-way points of x * 255: rounding ties must go to even on both paths
    values[1, :8] = (np.arange(8) + 0.5) / 255
    return values


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_arrays_in_host_memory_take_the_host_path(library: Library) -> None:
    # DLPack says where an array lives: here, host memory, where numpy reads it without a copy.
    on_library = library.from_numpy(np.zeros((4, 4), np.float32))
    assert not _in_device_memory(on_library)
    device1 = strict.asarray(np.zeros((4, 4), np.float32), device=strict.Device("device1"))
    assert not _in_device_memory(device1)  # a name for a device; its memory is numpy's


@pytest.mark.parametrize(("library", "dtype"), FLOATS, ids=str)
def test_float_arrays_quantize_bit_for_bit_like_numpy(library: Library, dtype: str, quantize: Any) -> None:
    array = _smooth().astype(dtype)
    out = quantize(library.from_numpy(array))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, to_intensities(array))


@pytest.mark.parametrize("library", [lib for lib in LIBRARIES if "float16" in lib.floats], ids=str)
def test_every_float16_value_in_the_unit_interval_matches_numpy(library: Library, quantize: Any) -> None:
    values = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).reshape(1, -1)
    from_library = quantize(library.from_numpy(values))
    np.testing.assert_array_equal(from_library, to_intensities(values))
    # and numpy's own float16 arithmetic, not only its lookup table
    np.testing.assert_array_equal(from_library, np.rint(values * np.float16(255)).astype(np.uint8))


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_uint8_arrays_pass_through_unchanged(library: Library, quantize: Any) -> None:
    array = np.random.default_rng(1).integers(0, 256, (48, 32), dtype=np.uint8)
    out = quantize(library.from_numpy(array))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("layout", ["(h, w, 1)", "(1, h, w)"])
@pytest.mark.parametrize(("library", "dtype"), [(lib, "uint8") for lib in LIBRARIES] + FLOATS, ids=str)
def test_single_channel_arrays_are_accepted(library: Library, dtype: str, layout: str, quantize: Any) -> None:
    array = _smooth(16)[:, :12]
    array = (array * 255).astype(np.uint8) if dtype == "uint8" else array.astype(dtype)
    with_channel = array[:, :, None] if layout == "(h, w, 1)" else array[None]
    out = quantize(library.from_numpy(with_channel))
    assert out.shape == (16, 12) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, to_intensities(array))


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_transposed_arrays_are_accepted(library: Library, quantize: Any) -> None:
    base = _smooth(32).astype(np.float32)
    transposed = library.from_numpy(base).T
    out = quantize(transposed)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, to_intensities(base.T))


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_an_array_numpy_cannot_convert_is_read_through_dlpack(dtype: str, quantize: Any) -> None:
    # array-api-strict's "device1" refuses np.asarray, as a GPU library does (CuPy), and lends
    # its memory only through DLPack.
    array = _smooth(24).astype(dtype) if dtype != "uint8" else (_smooth(24) * 255).astype(np.uint8)
    on_device = strict.asarray(array, device=strict.Device("device1"))
    with pytest.raises(RuntimeError, match="device"):
        np.asarray(on_device)
    np.testing.assert_array_equal(quantize(on_device), to_intensities(array))
    np.testing.assert_array_equal(host_copy(on_device), array)
    bad = strict.asarray(np.array([[0.5, np.nan]], np.float32), device=strict.Device("device1"))
    assert _message(bad, quantize) == (
        "activation map (float32, 2 pixels) has 1 NaN and 0 infinite values; expected finite values in [0, 1]"
    )


class Unreadable:
    """Stands in for a uint8 map of a GPU library numpy can read neither through DLPack nor
    __array__ (no GPU here): array-api-strict answers for its dtype and shape."""

    def __init__(self, array: Any) -> None:
        self.dtype, self.shape = array.dtype, array.shape

    def __array_namespace__(self) -> Any:
        return strict

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise BufferError("no host copies")

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 0)  # kDLCUDA

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


def test_an_array_numpy_cannot_read_at_all_is_refused_saying_so() -> None:
    unreadable = Unreadable(strict.asarray(np.zeros((4, 4), np.uint8)))
    message = _message(unreadable)
    assert message.startswith(
        "activation map of type Unreadable could not be copied to the host (Implicit conversion"
    ), message
    assert message.endswith(
        "expected an array numpy reads through DLPack (numpy >= 2.1 for one on a GPU) or __array__"
    )


@needs_torch
def test_grad_tracking_tensors_are_accepted(quantize: Any) -> None:
    base = torch.from_numpy(_smooth(32).astype(np.float32))
    leaf = base.clone().requires_grad_(True)
    np.testing.assert_array_equal(quantize(leaf), to_intensities(base.numpy()))


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_inputs_are_not_modified(library: Library, quantize: Any) -> None:
    array = _smooth(16).astype(np.float32)
    on_library = library.from_numpy(array)
    quantize(on_library)
    np.testing.assert_array_equal(host_copy(on_library), array)


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros((8, 8, 3), np.float32),  # 3 channels
        lambda: np.zeros((3, 8, 8), np.uint8),  # 3 channels first
        lambda: np.zeros((8, 8, 1, 1), np.uint8),  # 4 dimensions
        lambda: np.zeros(8, np.float32),  # 1 dimension
        lambda: np.zeros((0, 8), np.uint8),  # empty
        lambda: np.zeros((0, 8, 1), np.float32),  # empty after squeezing
        lambda: np.full((4, 4), np.nan, np.float32),  # NaN
        lambda: np.array([[0.0, np.inf], [np.nan, 0.5]], np.float32),  # NaN and inf
        lambda: np.array([[0.0, 1.5], [-0.25, 0.5]], np.float32),  # out of range
    ],
    ids=["3-channels", "3-first", "4d", "1d", "empty", "empty-squeezed", "nan", "nan-inf", "range32"],
)
def test_bad_arrays_are_refused_with_the_numpy_message(library: Library, make: Any, quantize: Any) -> None:
    array = make()
    assert _message(library.from_numpy(array), quantize) == _message(array)


@pytest.mark.parametrize(("library", "dtype"), FLOATS, ids=str)
def test_out_of_range_values_are_reported_in_the_maps_own_dtype(
    library: Library, dtype: str, quantize: Any
) -> None:
    array = np.array([[0.0, 1.5], [-0.25, 0.5]], dtype)
    message = _message(library.from_numpy(array), quantize)
    assert message == _message(array)
    assert message == (
        f"activation map ({dtype}) has values from min -0.25 to max 1.5; "
        "expected values in [0, 1] for a float map, or dtype uint8"
    )


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_too_many_pixels_gives_the_numpy_message(library: Library, quantize: Any) -> None:
    array = np.zeros((20, 10), np.float32)
    assert _message(library.from_numpy(array), quantize, max_pixels=100) == _message(array, max_pixels=100)


@pytest.mark.parametrize(
    ("library", "dtype"), [(lib, dtype) for lib in LIBRARIES for dtype in lib.others], ids=str
)
def test_other_dtypes_are_refused_naming_the_dtype_and_the_type(
    library: Library, dtype: str, quantize: Any
) -> None:
    array = np.zeros((4, 4), dtype)
    # What numpy says of the same values, and where they came from.
    assert _message(library.from_numpy(array), quantize) == _message(array).replace(
        "; expected", f" (converted from {library.type_name}); expected", 1
    )


def test_library_only_dtypes_are_refused_by_name(quantize: Any) -> None:
    message = _message(jnp.zeros((4, 4), dtype=jnp.bfloat16), quantize)
    assert message.startswith("activation map has dtype bfloat16 (converted from ArrayImpl); expected uint8")
    if torch is not None:
        message = _message(torch.zeros((4, 4), dtype=torch.bfloat16), quantize)
        assert message.startswith("activation map has dtype bfloat16 (converted from Tensor); expected uint8")


def test_importing_the_producer_imports_no_array_library() -> None:
    probe = (
        "import numpy as np\nimport producer\nfrom producer.intensity import to_intensities\n"
        "from producer import Producer\nProducer\n"
        "to_intensities(np.zeros((4, 4), np.float32))\n"
        "import sys\nprint(sorted({'torch', 'jax', 'array_api_strict'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- batches: batch_to_intensities ------------------------------------------------------


def _batch_on_device(maps: object, **kwargs: Any) -> np.ndarray:
    return _batch_intensities(maps, kwargs.get("max_pixels"), kwargs.get("image_ids"), on_device=True)


BATCH_PATHS = {"host": batch_to_intensities, "device": _batch_on_device}


@pytest.fixture(params=BATCH_PATHS, ids=str)
def quantize_batch(request: pytest.FixtureRequest) -> Callable[..., np.ndarray]:
    return BATCH_PATHS[request.param]  # type: ignore[return-value]


def _smooth_batch(count: int = 4, size: int = 24) -> np.ndarray:
    return np.stack([_smooth(size, seed) for seed in range(count)])


@pytest.mark.parametrize(("library", "dtype"), [(lib, "uint8") for lib in LIBRARIES] + FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["(B, H, W)", "(B, 1, H, W)"])
def test_batches_quantize_bit_for_bit_like_to_intensities_of_each_map(
    library: Library, dtype: str, layout: str, quantize_batch: Any
) -> None:
    maps = _smooth_batch()
    maps = (maps * 255).astype(np.uint8) if dtype == "uint8" else maps.astype(dtype)
    out = quantize_batch(library.from_numpy(maps if layout == "(B, H, W)" else maps[:, None]))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert out.shape == maps.shape
    for cam, row in zip(maps, out, strict=True):
        np.testing.assert_array_equal(row, to_intensities(cam))


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_a_batch_numpy_cannot_convert_is_read_through_dlpack(dtype: str, quantize_batch: Any) -> None:
    maps = _smooth_batch()
    maps = (maps * 255).astype(np.uint8) if dtype == "uint8" else maps.astype(dtype)
    on_device = strict.asarray(maps, device=strict.Device("device1"))
    np.testing.assert_array_equal(quantize_batch(on_device), batch_to_intensities(maps))


@pytest.mark.parametrize(("library", "dtype"), FLOATS, ids=str)
def test_the_first_bad_map_of_a_batch_is_refused_with_the_numpy_message(
    library: Library, dtype: str, quantize_batch: Any
) -> None:
    maps = _smooth_batch().astype(dtype)
    maps[2, 5, 5] = -0.25
    maps[3, 0, 0] = np.nan
    with pytest.raises(InvalidMapError) as raised:
        quantize_batch(library.from_numpy(maps), image_ids=["a", "b", "c", "d"])
    assert str(raised.value) == f"map 2 of the batch (image id 'c'): {_message(maps[2])}"


@pytest.mark.parametrize("library", LIBRARIES, ids=str)
def test_batches_of_other_dtypes_are_refused_naming_the_type(library: Library, quantize_batch: Any) -> None:
    with pytest.raises(InvalidMapError) as raised:
        quantize_batch(library.from_numpy(np.zeros((2, 4, 4), np.int8)))
    assert str(raised.value).startswith(f"activation map has dtype int8 (converted from {library.type_name})")
