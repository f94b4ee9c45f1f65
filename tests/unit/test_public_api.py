"""The public surface: what `producer` and `worker` export, and what importing the producer costs."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import producer
import producer.errors
import producer.kolena
import worker
from producer import Producer, Settings
from producer.errors import InvalidMapError
from producer.wire import decode_map

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
PUBLIC_MODULES = [producer, producer.errors, producer.kolena, worker]


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


def test_importing_the_worker_package_loads_neither_celery_nor_its_modules() -> None:
    # `celery -A worker.app` imports the package first: it must not build an app or read settings.
    loaded = imported_modules_after("import worker")
    assert not {m for m in loaded if m.split(".")[0] in {"celery", "kombu", "PIL", "boto3"}}
    assert "worker.app" not in loaded


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_name_in_dunder_all_is_importable_and_documented(module: types.ModuleType) -> None:
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", API_DOC.read_text()))
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but cannot be imported"
        assert name in documented, f"{module.__name__}.{name} is public but docs/api.md does not name it"


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_nothing_public_is_left_out_of_dunder_all(module: types.ModuleType) -> None:
    # Public: a name without a leading underscore defined in the module itself (its submodules and
    # what it imports for its own use aside).
    defined_here = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and getattr(value, "__module__", None) == module.__name__
    }
    assert defined_here <= set(module.__all__), sorted(defined_here - set(module.__all__))


def test_every_error_of_the_tree_is_exported_by_the_producer_package() -> None:
    errors = {
        name
        for name, value in vars(producer.errors).items()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == "producer.errors"
    }
    assert errors == set(producer.errors.__all__)
    assert errors <= set(producer.__all__)
    assert all(issubclass(getattr(producer, name), producer.ActmapError) for name in errors)


def test_the_error_tree_drawn_in_errors_names_every_error_under_its_parent() -> None:
    drawing = producer.errors.__doc__ or ""
    for name in producer.errors.__all__:
        error = getattr(producer.errors, name)
        line = next(line for line in drawing.splitlines() if re.search(rf"\b{name}\b", line))
        depth = len(line) - len(line.lstrip(" │├└─"))
        if name != "ActmapError":
            parent = error.__mro__[1].__name__
            parent_line = next(line for line in drawing.splitlines() if re.search(rf"\b{parent}\b", line))
            assert len(parent_line) - len(parent_line.lstrip(" │├└─")) < depth, name


def _packed(producer: Producer, cam: np.ndarray) -> bytes:
    return producer._pack(producer._prepare("a", cam, None, "jet", True)[1])


def test_float_maps_are_sent_quantized_as_png_scanlines(tmp_path: Path) -> None:
    cam = np.random.default_rng(0).random((224, 224), dtype=np.float32)
    decoded = decode_map(
        _packed(Producer(Settings(home=tmp_path)), cam), max_pixels=10**6, max_message_bytes=10**7
    )
    np.testing.assert_array_equal(decoded.scanlines.intensities(), np.rint(cam * 255).astype(np.uint8))


def test_a_map_too_large_for_a_message_is_refused_at_submit_naming_the_limit(tmp_path: Path) -> None:
    # 1024² uint8: 1,049,600 bytes of scanlines, over a 1 MiB message limit before any deflate
    producer = Producer(Settings(home=tmp_path, max_message_bytes=1 << 20))
    with pytest.raises(
        InvalidMapError,
        match=r"map 'big' \(1024 x 1024\) can make a map message of up to \d+ bytes; a map message "
        r"holds at most 1048576 \(ACTMAP_MAX_MESSAGE_BYTES",
    ):
        producer.submit("big", np.zeros((1024, 1024), np.uint8))
    # a quarter of that is accepted
    pending, message = producer._prepare("big", np.zeros((512, 512), np.uint8), None, "jet", True)
    assert (pending.image_id, message.intensities.shape) == ("big", (512, 512))
