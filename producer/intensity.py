"""Validate an activation map and turn it into uint8 intensities, exactly as Kolena quantizes it.

Numpy only at import: the producer imports this beside a GPU model, the worker before colorizing.
A torch tensor (CPU or CUDA) is validated and quantized on its own device, so only the uint8
result crosses to the host; torch is never imported here, only recognised once the caller has
imported it (``sys.modules``).
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from producer.errors import InvalidMapError

EXPECTED_DTYPES = "uint8, or float16/float32/float64 with values in [0, 1]"
EXPECTED_SHAPE = "(h, w) or (h, w, 1)"

_FLOAT_SIZES = (2, 4, 8)
_HALF_ONE_BITS = 0x3C00  # float16 1.0; bit patterns 0..0x3C00 are exactly +0.0 .. 1.0, in order


def to_intensities(activation_map: object, *, max_pixels: int | None = None) -> npt.NDArray[np.uint8]:
    """Return the map as a C-contiguous (h, w) uint8 array; raise InvalidMapError saying what is wrong.

    A contiguous uint8 input is returned without a copy (it may be the caller's array or a view of it).
    A torch tensor is checked and quantized on its device; only the uint8 result is copied to the host.
    """
    if type(activation_map) is not np.ndarray and is_torch_tensor(activation_map):
        return _tensor_intensities(activation_map, max_pixels)
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
        # numpy emulates float16 arithmetic one element at a time (about 1 ms for 224x224);
        # looking the bit patterns up in a table of every valid value is ~25x faster and exact.
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


# -- torch tensors, on their own device ----------------------------------------------------


def is_torch_tensor(activation_map: object) -> bool:
    # A tensor exists only once its caller imported torch: look it up, never import it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(activation_map, torch.Tensor)


def _tensor_intensities(tensor: Any, max_pixels: int | None) -> npt.NDArray[np.uint8]:
    """to_intensities for a torch tensor: same checks, same messages, same bits, on the tensor's device.

    A CUDA float32 map crosses to the host as uint8: a quarter of the bytes np.asarray would copy.
    """
    torch = sys.modules["torch"]
    tensor = tensor.detach()
    numpy_dtypes: dict[Any, np.dtype[Any]] = {
        torch.uint8: np.dtype(np.uint8),
        torch.float16: np.dtype(np.float16),
        torch.float32: np.dtype(np.float32),
        torch.float64: np.dtype(np.float64),
    }
    dtype = numpy_dtypes.get(tensor.dtype)
    if dtype is None:
        # The name numpy would give (int64, bool, ...); torch-only dtypes keep torch's name (bfloat16).
        name = str(tensor.dtype).removeprefix("torch.")
        raise InvalidMapError(_dtype_message(name, tensor))
    shape = tuple(int(n) for n in tensor.shape)
    if len(shape) == 3 and shape[2] == 1:
        tensor = tensor[:, :, 0]
    elif len(shape) != 2:
        raise InvalidMapError(_shape_message(shape))
    _check_size(tensor, max_pixels)
    if dtype != np.uint8:
        # min/max propagate NaN, as numpy's do; one 2-element transfer brings both to the host.
        bounds = torch.stack((tensor.min(), tensor.max())).cpu().numpy()
        low, high = bounds[0], bounds[1]
        if not (low >= 0 and high <= 1):
            nans = int(torch.isnan(tensor).sum())
            infs = int(torch.isinf(tensor).sum())
            raise InvalidMapError(_range_text(dtype, tensor.numel(), nans, infs, low, high))
        # rint(x * 255) in the tensor's own dtype; torch.round is half-to-even like np.rint.
        tensor = torch.round(tensor * 255).to(torch.uint8)
    host: npt.NDArray[np.uint8] = tensor.contiguous().cpu().numpy()
    return host
