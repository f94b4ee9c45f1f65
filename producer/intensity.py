"""Validate an activation map and turn it into uint8 intensities, exactly as Kolena quantizes it.

Numpy only at import: the producer imports this beside a GPU model, the worker before colorizing.
A torch tensor, or an array of a library of the Python array API standard (JAX, CuPy:
``__array_namespace__``), is validated with its own library; on a GPU it is quantized there too,
so only the uint8 result crosses to the host. No such library is imported here, only recognised
once the caller has imported it (torch: ``sys.modules``).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from producer.errors import InvalidMapError

EXPECTED_DTYPES = "uint8, or float16/float32/float64 with values in [0, 1]"
EXPECTED_SHAPE = "(h, w), (h, w, 1) or (1, h, w)"
EXPECTED_BATCH_SHAPE = "(B, H, W) or (B, 1, H, W)"

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
    _check_numpy_dtype(array.dtype, activation_map)
    array = _squeeze(array)
    _check_size(array.shape, max_pixels)
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    return _quantize(array)


def batch_to_intensities(
    maps: object, *, max_pixels: int | None = None, image_ids: Sequence[str] | None = None
) -> npt.NDArray[np.uint8]:
    """Return a (B, H, W) or (B, 1, H, W) batch as one C-contiguous (B, H, W) uint8 array.

    The checks and bits of ``to_intensities`` of each map, in one operation over the batch: one
    range check, one quantization on the batch's own device, one copy to the host. When the range
    check fails, the first bad map is found and refused with ``to_intensities``'s message, naming
    its index (and ``image_ids[index]``, given).
    """
    return _batch_intensities(maps, max_pixels, image_ids)


def _batch_intensities(
    maps: object, max_pixels: int | None, image_ids: Sequence[str] | None, *, on_device: bool | None = None
) -> npt.NDArray[np.uint8]:
    """batch_to_intensities; ``on_device`` as for _library_intensities (by default, DLPack says)."""
    library = None if type(maps) is np.ndarray else _library(maps)
    if library is None:
        array = _as_array(maps)
        _check_numpy_dtype(array.dtype, maps)
        dtype = array.dtype
    else:
        array = library.array
        dtype = _library_dtype(array, library.xp)
    shape = batch_shape(array)
    if len(shape) == 4:
        array = array[:, 0, :, :]
    _check_size(shape[-2:], max_pixels)
    if shape[0] == 0:
        return np.zeros((0, *shape[-2:]), np.uint8)

    if on_device is None:
        on_device = library is not None and _in_device_memory(array)

    def refuse(*_: Any) -> InvalidMapError:
        return _first_bad_map(array, library, on_device, image_ids)

    return _to_uint8_on_host(array, dtype, library, on_device, refuse)


def batch_shape(maps: Any) -> tuple[int, ...]:
    """The shape of a batch of maps, (B, H, W) or (B, 1, H, W); InvalidMapError for any other."""
    shape = getattr(maps, "shape", None)
    if shape is None:
        raise InvalidMapError(
            f"a batch of activation maps of type {type(maps).__name__} has no shape; expected a numpy "
            f"array, torch tensor or array API array of shape {EXPECTED_BATCH_SHAPE}"
        )
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[1] == 1):
        return shape
    if len(shape) == 4:
        # (B, C, H, W) or (B, H, W, C): the channels are the smaller
        return _refuse_batch_shape(shape, f"{min(shape[1], shape[3])} channels")
    dims = "dimension" if len(shape) == 1 else "dimensions"
    return _refuse_batch_shape(shape, f"{len(shape)} {dims}")


def _refuse_batch_shape(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    raise InvalidMapError(
        f"batch of activation maps has shape {shape}: {what}; expected {EXPECTED_BATCH_SHAPE}"
    )


def _first_bad_map(
    maps: Any, library: _Library | None, on_device: bool, image_ids: Sequence[str] | None
) -> InvalidMapError:
    """The refusal of the first map of a batch that fails the range check, as to_intensities words it."""
    for index in range(int(maps.shape[0])):
        try:
            _one_map(maps[index, :, :], library, on_device)
        except InvalidMapError as exc:
            label = "" if image_ids is None else f" (image id {image_ids[index]!r})"
            return InvalidMapError(f"map {index} of the batch{label}: {exc}")
    return InvalidMapError(f"a batch of {maps.shape[0]} maps failed the range check but none of its maps")


def _one_map(activation_map: Any, library: _Library | None, on_device: bool) -> npt.NDArray[np.uint8] | None:
    if library is None:
        return to_intensities(activation_map)
    return _library_intensities(activation_map, None, on_device=on_device)


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


def _check_numpy_dtype(dtype: np.dtype[Any], activation_map: object) -> None:
    is_float = dtype.kind == "f" and dtype.itemsize in _FLOAT_SIZES
    if not (dtype == np.uint8 or is_float):
        raise InvalidMapError(_dtype_message(dtype, activation_map))


def _squeeze(array: Any) -> Any:
    """The (h, w) plane of a numpy array, torch tensor or array API array of shape (h, w), (h, w, 1)
    or (1, h, w); (1, n, 1) is read as (h, w, 1), a single row."""
    shape = tuple(int(n) for n in array.shape)
    if len(shape) == 2:
        return array
    if len(shape) == 3 and shape[2] == 1:
        return array[:, :, 0]
    if len(shape) == 3 and shape[0] == 1:
        return array[0, :, :]
    raise InvalidMapError(_shape_message(shape))


def _shape_message(shape: tuple[int, ...]) -> str:
    ndim = len(shape)
    if ndim == 3:
        # Channels last (h, w, c) or first (c, h, w): the channels are the smaller end.
        channels = min(shape[0], shape[2])
        return f"activation map has shape {shape}: {channels} channels; expected {EXPECTED_SHAPE}"
    dims = "dimension" if ndim == 1 else "dimensions"
    return f"activation map has shape {shape}: {ndim} {dims}; expected {EXPECTED_SHAPE}"


def _check_size(shape: Sequence[int], max_pixels: int | None) -> None:
    """``shape`` is a map's (h, w)."""
    shape = tuple(int(n) for n in shape)  # torch.Size prints as torch.Size([h, w])
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


def _quantize(
    array: npt.NDArray[np.floating[Any]], refuse: Callable[..., InvalidMapError] | None = None
) -> npt.NDArray[np.uint8]:
    """rint(array * 255) as uint8, of one map or a batch; ``refuse(low, high)`` words a range refusal."""
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
        raise (refuse or functools.partial(_range_error, np, array.dtype, array))(low, high)
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


def _range_error(xp: Any, dtype: np.dtype[Any], array: Any, low: Any, high: Any) -> InvalidMapError:
    """The refusal of a map out of range, its NaN and infinities counted with its own library ``xp``."""
    nans = int(xp.count_nonzero(xp.isnan(array)))
    infs = int(xp.count_nonzero(xp.isinf(array)))
    return InvalidMapError(_range_text(dtype, math.prod(array.shape), nans, infs, low, high))


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
    dtype = _library_dtype(library.array, library.xp)
    array = _squeeze(library.array)
    _check_size(array.shape, max_pixels)
    device = _in_device_memory(array) if on_device is None else on_device
    refuse = functools.partial(_range_error, library.xp, dtype, array)
    return _to_uint8_on_host(array, dtype, library, device, refuse)


def _library_dtype(array: Any, xp: Any) -> np.dtype[Any]:
    dtype = _numpy_dtype(array.dtype, xp)
    if dtype is None:
        # The name numpy would give (int64, bool, ...); others keep their library's (bfloat16).
        raise InvalidMapError(_dtype_message(str(array.dtype).rpartition(".")[2], array))
    return dtype


def _to_uint8_on_host(
    array: Any, dtype: np.dtype[Any], library: _Library | None, on_device: bool, refuse: Callable[..., Any]
) -> npt.NDArray[np.uint8]:
    """A checked map or batch, numpy's or a library's, as C-contiguous uint8 in host memory.

    In device memory it is quantized there and copied once; in host memory numpy reads it and
    quantizes it. ``refuse(low, high)`` makes the error of values out of [0, 1].
    """
    if library is not None and not on_device:
        array = library.to_host(array)
    if library is None or not on_device:
        return np.ascontiguousarray(array) if dtype == np.uint8 else _quantize(array, refuse)
    xp = library.xp
    if dtype != np.uint8:
        # min/max propagate NaN, as numpy's do; one 2-element transfer brings both to the host.
        bounds = library.to_host(xp.stack((xp.min(array), xp.max(array))))
        low, high = bounds[0], bounds[1]
        if not (low >= 0 and high <= 1):
            raise refuse(low, high)
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
