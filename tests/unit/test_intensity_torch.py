"""producer.intensity on torch tensors: quantized on the tensor's device, bit for bit like numpy.

CPU tensors stand in for CUDA ones: the path is the same (checks and rint(x * 255) run where the
tensor lives, only the uint8 result is copied to the host).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from producer.errors import InvalidMapError
from producer.intensity import to_intensities

torch = pytest.importorskip("torch")

FLOAT_DTYPES = [torch.float16, torch.float32, torch.float64]
NUMPY_OF = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def _message(activation_map: object, **kwargs: Any) -> str:
    with pytest.raises(InvalidMapError) as info:
        to_intensities(activation_map, **kwargs)
    return str(info.value)


def _smooth(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.random((size, size))
    values[0, 0], values[0, 1] = 0.0, 1.0
    # exact half-way points of x * 255: rounding ties must go to even on both paths
    values[1, :8] = (np.arange(8) + 0.5) / 255
    return values


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_float_tensors_quantize_bit_for_bit_like_numpy(dtype: Any) -> None:
    array = _smooth().astype(NUMPY_OF[dtype])
    out = to_intensities(torch.from_numpy(array.copy()))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, to_intensities(array))


def test_every_float16_value_in_the_unit_interval_matches_numpy() -> None:
    values = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16).reshape(1, -1)
    from_tensor = to_intensities(torch.from_numpy(values.copy()))
    np.testing.assert_array_equal(from_tensor, to_intensities(values))
    # and numpy's own float16 arithmetic, not only its lookup table
    np.testing.assert_array_equal(from_tensor, np.rint(values * np.float16(255)).astype(np.uint8))


def test_uint8_tensors_pass_through_unchanged() -> None:
    array = np.random.default_rng(1).integers(0, 256, (48, 32), dtype=np.uint8)
    out = to_intensities(torch.from_numpy(array.copy()))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("dtype", [torch.uint8, *FLOAT_DTYPES], ids=str)
def test_single_channel_tensors_are_accepted(dtype: Any) -> None:
    array = _smooth(16)
    tensor = (
        torch.from_numpy(array).to(dtype)
        if dtype != torch.uint8
        else torch.from_numpy((array * 255).astype(np.uint8))
    )
    out = to_intensities(tensor[:, :, None])
    assert out.shape == (16, 16)
    np.testing.assert_array_equal(out, to_intensities(tensor.numpy()))


def test_non_contiguous_and_grad_tracking_tensors_are_accepted() -> None:
    base = torch.from_numpy(_smooth(32).astype(np.float32))
    transposed = base.t()
    np.testing.assert_array_equal(to_intensities(transposed), to_intensities(transposed.numpy()))
    leaf = base.clone().requires_grad_(True)
    np.testing.assert_array_equal(to_intensities(leaf), to_intensities(base.numpy()))


def test_inputs_are_not_modified() -> None:
    tensor = torch.from_numpy(_smooth(16).astype(np.float32))
    before = tensor.clone()
    to_intensities(tensor)
    assert torch.equal(tensor, before)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.zeros((8, 8, 3), np.float32),  # 3 channels
        lambda: np.zeros((8, 8, 1, 1), np.uint8),  # 4 dimensions
        lambda: np.zeros(8, np.float32),  # 1 dimension
        lambda: np.zeros((0, 8), np.uint8),  # empty
        lambda: np.zeros((0, 8, 1), np.float32),  # empty after squeezing
        lambda: np.full((4, 4), np.nan, np.float32),  # NaN
        lambda: np.array([[0.0, np.inf], [np.nan, 0.5]], np.float64),  # NaN and inf
        lambda: np.array([[0.0, 1.5], [-0.25, 0.5]], np.float32),  # out of range
        lambda: np.array([[0.0, 1.5], [-0.25, 0.5]], np.float16),  # out of range, float16
    ],
    ids=["3-channels", "4d", "1d", "empty", "empty-squeezed", "nan", "nan-inf", "range32", "range16"],
)
def test_bad_tensors_are_refused_with_the_numpy_message(make: Any) -> None:
    array = make()
    assert _message(torch.from_numpy(array)) == _message(array)


def test_too_many_pixels_gives_the_numpy_message() -> None:
    array = np.zeros((20, 10), np.float32)
    assert _message(torch.from_numpy(array), max_pixels=100) == _message(array, max_pixels=100)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.int8])
def test_other_dtypes_are_refused_with_the_message_numpy_conversion_gave(dtype: Any) -> None:
    tensor = torch.zeros((4, 4), dtype=dtype)
    # What the numpy path said of the same tensor before tensors had their own path.
    assert _message(tensor) == _message(tensor.numpy()).replace(
        "; expected", " (converted from Tensor); expected", 1
    )
    assert f"dtype {np.dtype(tensor.numpy().dtype)} (converted from Tensor)" in _message(tensor)


def test_torch_only_dtypes_are_refused_by_name() -> None:
    message = _message(torch.zeros((4, 4), dtype=torch.bfloat16))
    assert message.startswith("activation map has dtype bfloat16 (converted from Tensor); expected uint8")


def test_importing_the_producer_does_not_import_torch() -> None:
    probe = (
        "import numpy as np\nimport producer\nfrom producer.intensity import to_intensities\n"
        "from producer import Producer\nProducer\n"
        "to_intensities(np.zeros((4, 4), np.float32))\n"
        "import sys\nprint('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
