"""The public surface: what `producer` exports, and what importing it costs a GPU process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import producer
from producer import Producer, Settings
from producer.errors import InvalidMapError
from producer.scanlines import Scanlines
from producer.wire import decode_map


def imported_modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_producer_and_its_client_loads_neither_pillow_nor_boto3() -> None:
    loaded = imported_modules_after("import producer\nfrom producer import Producer\nProducer")
    assert "celery" in loaded  # the client did load
    assert not {m for m in loaded if m.split(".")[0] in {"PIL", "boto3", "botocore", "worker"}}


def test_importing_the_producer_package_alone_does_not_load_celery() -> None:
    loaded = imported_modules_after("import producer")
    assert "celery" not in loaded and "kombu" not in loaded


def test_every_name_in_dunder_all_exists() -> None:
    for name in producer.__all__:
        assert getattr(producer, name) is not None, name


def _packed(producer: Producer, cam: np.ndarray) -> bytes:
    return producer._sender._pack(producer._prepare("a", cam, None, "jet", True)[1])


def test_float_maps_are_sent_quantized_by_default_a_quarter_of_the_bytes(tmp_path) -> None:
    cam = np.random.default_rng(0).random((224, 224), dtype=np.float32)
    quantized = _packed(Producer(Settings(home=tmp_path, wire_version=1, wire_compress_level=0)), cam)
    raw = _packed(
        Producer(Settings(home=tmp_path, wire_version=1, wire_compress_level=0, quantize=False)), cam
    )
    decoded = decode_map(quantized, max_pixels=10**6, max_message_bytes=10**7)
    assert isinstance(decoded.array, np.ndarray)
    assert decoded.array.dtype == np.uint8
    np.testing.assert_array_equal(decoded.array, np.rint(cam * 255).astype(np.uint8))
    assert len(raw) > 3.9 * len(quantized)
    assert decode_map(raw, max_pixels=10**6, max_message_bytes=10**7).array.dtype == np.float32  # type: ignore[union-attr]


def test_quantized_maps_are_sent_as_png_scanlines_by_default_and_unquantized_ones_as_arrays(tmp_path) -> None:
    cam = np.random.default_rng(0).random((224, 224), dtype=np.float32)
    decoded = decode_map(
        _packed(Producer(Settings(home=tmp_path)), cam), max_pixels=10**6, max_message_bytes=10**7
    )
    assert isinstance(decoded.array, Scanlines)
    np.testing.assert_array_equal(decoded.array.intensities(), np.rint(cam * 255).astype(np.uint8))
    raw = _packed(Producer(Settings(home=tmp_path, quantize=False)), cam)
    unquantized = decode_map(raw, max_pixels=10**6, max_message_bytes=10**7).array
    assert isinstance(unquantized, np.ndarray)
    np.testing.assert_array_equal(unquantized, cam)


def test_a_map_too_large_for_a_message_is_refused_at_submit_naming_the_limit(tmp_path) -> None:
    # 512² float32 unquantized: 1 MiB, over a 1 MiB message limit once ids are added
    producer = Producer(Settings(home=tmp_path, quantize=False, max_message_bytes=1 << 20))
    cam = np.zeros((512, 512), np.float32)
    with pytest.raises(
        InvalidMapError,
        match=r"map 'big' is 1048576 bytes as sent \(float32\); a map message "
        r"holds at most 1048576 \(ACTMAP_MAX_MESSAGE_BYTES.*quantizing",
    ):
        producer.submit("big", cam)
    # quantized, the same map is a quarter of that, and is accepted
    assert Producer(Settings(home=tmp_path, max_message_bytes=1 << 20))._prepare(
        "big", cam, None, "jet", True
    )


def test_the_readme_settings_table_lists_every_setting_with_its_default_and_meaning() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(ACTMAP_[A-Z0-9_]+)` \| (.*?) \|", readme, re.MULTILINE))
    assert set(rows) == {f"ACTMAP_{name.upper()}" for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        line = next(line for line in readme.splitlines() if line.startswith(f"| `ACTMAP_{name.upper()}` |"))
        assert str(field.description) in line, name
        if field.default is not None and not isinstance(field.default, bool):
            assert f"`{field.default}`" in line, name
