"""examples/gradcam_producer.py: its Grad-CAM, and the whole example against a real worker."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from tests.support.workers import WorkerProcess, clean_env

torch = pytest.importorskip("torch", reason="torch is not installed (optional: pip install torch)")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gradcam_producer.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradcam_producer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brightness_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A model whose top class (0) scores how much bright input there is, wherever it is."""
    last_conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        last_conv,
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    with torch.no_grad():
        for conv in (model[0], last_conv):
            conv.weight.fill_(1 / 27)
            conv.bias.zero_()
        model[6].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
        model[6].bias.zero_()
    return model.eval(), last_conv


@pytest.mark.parametrize(("top", "left"), [(4, 4), (40, 28)])
def test_grad_cam_is_hot_where_the_region_that_decides_the_top_class_is(
    example: ModuleType, top: int, left: int
) -> None:
    model, layer = brightness_model()
    image = torch.zeros(3, 64, 48)
    image[:, top : top + 12, left : left + 12] = 1.0
    grad_cam = example.GradCAM(model, layer)
    try:
        cams, classes = grad_cam(image)
    finally:
        grad_cam.close()
    assert classes == [0]
    cam = cams[0]
    assert cam.shape == (64, 48)
    assert cam.dtype == np.float32
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert top <= peak[0] < top + 12
    assert left <= peak[1] < left + 12
    inside = np.zeros(cam.shape, bool)
    inside[top : top + 12, left : left + 12] = True
    assert cam[inside].mean() > 0.5
    assert cam[~inside].mean() < 0.1


def test_grad_cam_of_the_example_model_is_a_float32_map_in_0_1_of_the_image_size_that_is_not_constant(
    example: ModuleType,
) -> None:
    model = example.make_model(seed=0)
    grad_cam = example.GradCAM(model, model.last_conv)
    try:
        images = torch.stack([example.to_tensor(example.synthetic_image(i, 64)) for i in range(3)])
        cams, classes = grad_cam(images)
        again, _ = grad_cam(images[1])
    finally:
        grad_cam.close()
    assert cams.shape == (3, 64, 64)
    assert cams.dtype == np.float32
    assert len(classes) == 3
    assert all(0 <= c < example.NUM_CLASSES for c in classes)
    for cam in cams:
        assert cam.min() == 0.0
        assert cam.max() == 1.0
        assert cam.std() > 0.01
    # A batch gives each image the map it gets alone, and the hooks leave no gradients behind.
    np.testing.assert_allclose(again[0], cams[1], atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # Closed: the layer runs without the hook keeping anything.
    model(images)
    assert not model.last_conv._forward_hooks


def test_the_gradcam_example_submits_a_folder_of_images_and_prints_the_timing_and_each_locator(
    tmp_path: Path,
) -> None:
    pytest.importorskip("kolena.workflow.visualization", reason="kolena (a test extra) runs the inline path")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        suffix = ".png" if i % 2 else ".jpg"
        Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 80, 3), dtype=np.uint8)).save(
            images / f"img-{i}{suffix}"
        )
    inline_dir = tmp_path / "inline"
    env = {"ACTMAP_HOME": str(tmp_path / "home")}
    worker = WorkerProcess(env, tmp_path)
    try:
        run = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--images",
                str(images),
                "--count",
                "4",
                "--size",
                "64",
                "--inline-count",
                "1",
                "--inline-dir",
                str(inline_dir),
                "--timeout",
                "60",
            ],
            env={**clean_env(env), "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        worker.stop()
    assert run.returncode == 0, run.stderr + worker.log()[-3000:]
    assert "Warning" not in run.stderr, run.stderr  # e.g. torch's about non-writable arrays
    out = run.stdout
    for row in (
        "model + Grad-CAM alone",
        "(1) inline extra",
        "(2) actmap submit extra",
        "ratio inline/actmap",
    ):
        assert row in out
    inline_row = next(line for line in out.splitlines() if line.startswith("(1) inline extra"))
    assert inline_row.split()[3] == "1"  # one image through Kolena's path
    assert "inline path on 1 of 4 images" in run.stderr

    locators = dict(line.split(" ", 1) for line in out.splitlines() if "file://" in line)
    assert sorted(locators) == [f"img-{i}" for i in range(4)]
    for image_id, locator in locators.items():
        png = tmp_path / "home" / "maps" / f"{image_id}.png"
        assert locator == png.as_uri()
        with Image.open(png) as decoded:
            assert decoded.format == "PNG"
            assert decoded.size == (64, 64)
    (inline_png,) = inline_dir.iterdir()
    assert inline_png.name == "img-0.png"
    with Image.open(inline_png) as decoded:
        assert (decoded.mode, decoded.size) == ("RGBA", (64, 64))
