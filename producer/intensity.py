"""Validate an activation map and turn it into uint8 intensities, exactly as Kolena quantizes it.

Numpy only at import: the producer imports this beside a GPU model, the worker before colorizing.
A torch tensor, or an array of a library of the Python array API standard (JAX, CuPy:
``__array_namespace__``), is validated with its own library; on a GPU it is quantized there too,
so only the uint8 result crosses to the host. No such library is imported here, only recognised
once the caller has imported it (torch: ``sys.modules``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from producer.errors import InvalidMapError

EXPECTED_DTYPES = "uint8, or float16/float32/float64 with values in [0, 1]"
EXPECTED_SHAPE = "(h, w) or (h, w, 1)"

_FLOAT_SIZES = (2, 4, 8)
_LIBRARY_DTYPES = ("uint8", "float16", "float32", "float64")  # by name, in any array library
_DLPACK_CPU = 1  # DLPack's kDLCPU: host memory
_HALF_ONE_BITS = 0x3C00  # float16 1.0; bit patterns 0..0x3C00 are exactly +0.0 .. 1.0, in order


def to_intensities(activation_map: object, *, max_pixels: int | None = None) -> npt.NDArray[np.uint8]:
    """Return the map as a C-contiguous (h, w) uint8 array; raise InvalidMapError saying what is wrong.

    A contiguous uint8 input is returned without a copy (it may be the caller's array or a view of it).
    A torch tensor, or an array of a library of the array API standard (JAX, CuPy), is checked with
    its own library; in device memory it is quantized there, and only the uint8 result is copied.
    """
    if type(activation_map) is not np.ndarray:
        from_library = _library_intensities(activation_map, max_pixels)
        if from_library is not None:
            return from_library
    array = _as_array(activation_map)
    dtype = array.dtype
    is_uint8 = dtype == np.uint8
    is_float = dtype.kind == "f" and dtype.itemsize in _FLOAT_SIZES
    if not (is_uint8 or is_float):
        raise InvalidMapError(_dtype_message(dtype, activation_map))
    array = _squeeze(array)
    _check_size(array, max_pixels)
    if is_uint8:
        return np.ascontiguousarray(array)
    return _quantize(array)


def _as_array(activation_map: object) -> npt.NDArray[Any]:
    # Subclasses (masked arrays, matrices, memmaps) go through asarray and become plain arrays.
    if type(activation_map) is np.ndarray:
        return activation_map
    try:
        return np.asarray(activation_map)
    except (ValueError, TypeError) as exc:  # ragged nested lists, objects whose __array__ fails
        raise InvalidMapError(
            f"activation map of type {type(activation_map).__name__} is not convertible to an array ({exc}); "
            f"expected a numpy array of shape {EXPECTED_SHAPE}, dtype {EXPECTED_DTYPES}"
        ) from exc


def _origin(activation_map: object) -> str:
    # A list of ints silently becomes int64: naming the source type makes that message clear.
    if type(activation_map) is np.ndarray:
        return ""
    return f" (converted from {type(activation_map).__name__})"


def _dtype_message(dtype: object, activation_map: object) -> str:
    return f"activation map has dtype {dtype}{_origin(activation_map)}; expected {EXPECTED_DTYPES}"


def _squeeze(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    if array.ndim == 2:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return array[:, :, 0]
    raise InvalidMapError(_shape_message(array.shape))


def _shape_message(shape: tuple[int, ...]) -> str:
    ndim = len(shape)
    if ndim == 3:
        return f"activation map has shape {shape}: {shape[2]} channels; expected {EXPECTED_SHAPE}"
    dims = "dimension" if ndim == 1 else "dimensions"
    return f"activation map has shape {shape}: {ndim} {dims}; expected {EXPECTED_SHAPE}"


def _check_size(array: Any, max_pixels: int | None) -> None:
    """``array`` is a 2D numpy array or torch tensor."""
    shape = array.shape
    if type(shape) is not tuple:  # torch.Size prints as torch.Size([h, w])
        shape = tuple(shape)
    pixels = shape[0] * shape[1]
    if pixels == 0:
        raise InvalidMapError(
            f"activation map is empty: shape {shape}, 0 pixels; expected at least 1 pixel, {EXPECTED_SHAPE}"
        )
    if max_pixels is not None and pixels > max_pixels:
        height, width = shape
        raise InvalidMapError(
            f"activation map has {pixels} pixels ({height} x {width}); "
            f"expected at most {max_pixels} (max_pixels)"
        )


def _quantize(array: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.uint8]:
    if array.dtype.itemsize == 2 and array.dtype.isnative:
        # numpy emulates float16 arithmetic one element at a time; looking the bit patterns up
        # in a table of every valid value is much faster, and exact.
        bits = array.view(np.uint16)
        if bits.max() <= _HALF_ONE_BITS:
            return np.take(_half_intensities(), bits)
    # np.min/np.max propagate NaN and NaN fails every comparison, so this one range test also
    # rejects NaN and ±inf; counting them is left to the error path.
    low, high = array.min(), array.max()
    if not (low >= 0 and high <= 1):
        raise InvalidMapError(_range_message(array, low, high))
    # Kolena computes rint(map * 255) in the map's own dtype: float16 rounds differently from
    # float32, so multiplying by a scalar of the same dtype keeps the outputs identical.
    scaled: npt.NDArray[np.floating[Any]] = np.multiply(array, array.dtype.type(255), order="C")
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


@cache
def _half_intensities() -> npt.NDArray[np.uint8]:
    """Kolena's rint(x * 255) in float16 for every float16 x in [+0.0, 1.0], indexed by bit pattern."""
    values = np.arange(_HALF_ONE_BITS + 1, dtype=np.uint16).view(np.float16)
    table: npt.NDArray[np.uint8] = np.rint(values * np.float16(255)).astype(np.uint8)
    table.flags.writeable = False
    return table


def _range_message(array: npt.NDArray[np.floating[Any]], low: Any, high: Any) -> str:
    nans = int(np.count_nonzero(np.isnan(array)))
    infs = int(np.count_nonzero(np.isinf(array)))
    return _range_text(array.dtype, array.size, nans, infs, low, high)


def _range_text(dtype: np.dtype[Any], size: int, nans: int, infs: int, low: Any, high: Any) -> str:
    if nans or infs:
        return (
            f"activation map ({dtype}, {size} pixels) has {nans} NaN and {infs} infinite values; "
            f"expected finite values in [0, 1]"
        )
    return (
        f"activation map ({dtype}) has values from min {low} to max {high}; "
        f"expected values in [0, 1] for a float map, or dtype uint8"
    )


# -- arrays of other libraries (torch, JAX, CuPy, ...) -------------------------------------


@dataclass(frozen=True)
class _Library:
    """An array of another library, and how that library makes it uint8 and copies it to the host."""

    array: Any
    xp: Any  # torch, or the array's array API namespace
    to_uint8: Callable[[Any], Any]
    to_host: Callable[[Any], npt.NDArray[Any]]


def is_torch_tensor(activation_map: object) -> bool:
    # A tensor exists only once its caller imported torch: look it up, never import it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(activation_map, torch.Tensor)


def array_namespace(activation_map: object) -> Any | None:
    """The array API namespace of a non-numpy array (JAX, CuPy, ...: ``__array_namespace__``), or None."""
    if isinstance(activation_map, np.ndarray | np.generic):  # numpy 2 has one too: numpy's own path
        return None
    get_namespace = getattr(activation_map, "__array_namespace__", None)
    return None if get_namespace is None else get_namespace()


def _library(activation_map: Any) -> _Library | None:
    if is_torch_tensor(activation_map):
        torch = sys.modules["torch"]
        return _Library(activation_map.detach(), torch, lambda t: t.to(torch.uint8), _torch_to_host)
    xp = array_namespace(activation_map)
    if xp is None:
        return None
    return _Library(activation_map, xp, lambda a: xp.astype(a, xp.uint8), _dlpack_to_host)


def _library_intensities(
    activation_map: Any, max_pixels: int | None, *, on_device: bool | None = None
) -> npt.NDArray[np.uint8] | None:
    """to_intensities of a torch tensor or an array API array (None for anything else): the same
    checks, messages and bits as numpy's, with the array's own library.

    A map in device memory is quantized there (``on_device``; by default, unless DLPack says it
    is in host memory) and only the uint8 result, with its min and max, crosses to the host: for
    a CUDA float32 map a quarter of the bytes np.asarray would copy. A map in host memory is read
    by numpy without a copy and quantized as a numpy map: faster than a library's own
    operations, each dispatched on its own.
    """
    library = _library(activation_map)
    if library is None:
        return None
    array, xp = library.array, library.xp
    dtype = _numpy_dtype(array.dtype, xp)
    if dtype is None:
        # The name numpy would give (int64, bool, ...); others keep their library's (bfloat16).
        raise InvalidMapError(_dtype_message(str(array.dtype).rpartition(".")[2], array))
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 3 and shape[2] == 1:
        array = array[:, :, 0]
    elif len(shape) != 2:
        raise InvalidMapError(_shape_message(shape))
    _check_size(array, max_pixels)
    if not (_in_device_memory(array) if on_device is None else on_device):
        host = library.to_host(array)
        return np.ascontiguousarray(host) if dtype == np.uint8 else _quantize(host)
    if dtype != np.uint8:
        # min/max propagate NaN, as numpy's do; one 2-element transfer brings both to the host.
        bounds = library.to_host(xp.stack((xp.min(array), xp.max(array))))
        low, high = bounds[0], bounds[1]
        if not (low >= 0 and high <= 1):
            nans = int(xp.count_nonzero(xp.isnan(array)))
            infs = int(xp.count_nonzero(xp.isinf(array)))
            raise InvalidMapError(_range_text(dtype, math.prod(shape), nans, infs, low, high))
        # rint(x * 255) in the array's own dtype (a Python scalar keeps float16 float16); the
        # array API's round, like torch's, is half-to-even as np.rint is.
        array = library.to_uint8(xp.round(array * 255))
    return np.ascontiguousarray(library.to_host(array))


def _numpy_dtype(dtype: Any, xp: Any) -> np.dtype[Any] | None:
    # The array API does not require float16: a library without it has no such maps.
    for name in _LIBRARY_DTYPES:
        candidate = getattr(xp, name, None)
        if candidate is not None and dtype == candidate:
            return np.dtype(name)
    return None


def _in_device_memory(array: Any) -> bool:
    try:
        return bool(array.__dlpack_device__()[0] != _DLPACK_CPU)
    except (AttributeError, TypeError, RuntimeError, BufferError):  # no DLPack: let the library quantize
        return True


def _torch_to_host(tensor: Any) -> npt.NDArray[Any]:
    host: npt.NDArray[Any] = tensor.contiguous().cpu().numpy()
    return host


def _dlpack_to_host(array: Any) -> npt.NDArray[Any]:
    try:
        # numpy >= 2.1 asks the array's library for a host copy (CuPy, JAX on a GPU); for an
        # array in host memory, no copy at all.
        return np.from_dlpack(array, device="cpu")
    except (BufferError, RuntimeError, TypeError, ValueError):
        pass
    try:  # an older numpy, or a library without DLPack host copies: its __array__, if any
        return np.asarray(array)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidMapError(
            f"activation map of type {type(array).__name__} could not be copied to the host ({exc}); "
            "expected an array numpy reads through DLPack (numpy >= 2.1 for one on a GPU) or __array__"
        ) from exc
