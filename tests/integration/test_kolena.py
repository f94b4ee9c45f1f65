"""Kolena assembly against the real kolena package: BitmapMasks and filled-in inferences."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from producer import MapResult
from producer.errors import MissingMapError
from producer.kolena import bitmap_mask, bitmap_masks, fill_activation_maps
from tests.integration.conftest import Stack
from tests.support.workers import WorkerProcess, clean_env

annotation = pytest.importorskip("kolena.workflow.annotation", reason="kolena is a test extra")
workflow = pytest.importorskip("kolena.workflow")

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inference(workflow.Inference):  # type: ignore[misc, name-defined]
    label: str
    activation_map: annotation.BitmapMask | None = None  # type: ignore[name-defined]


def test_results_of_a_real_run_become_kolena_bitmap_masks_equal_to_their_serialized_form(
    local_stack: Stack,
) -> None:
    with local_stack.producer() as producer:
        handles = [producer.submit(f"kolena/{i}", np.full((8, 8), i / 4, np.float32)) for i in range(3)]
        results = producer.collect(handles, timeout=60)
    masks = bitmap_masks(results)
    assert set(masks) == {(f"kolena/{i}", None) for i in range(3)}
    for result in results:
        mask = masks[(result.image_id, None)]
        assert isinstance(mask, annotation.BitmapMask)
        assert mask.locator == result.locator
        assert dict(mask._to_dict()) == result.bitmap_mask  # the form stored in each result


def test_inferences_get_their_images_activation_map_by_image_id() -> None:
    results = [
        MapResult("a", None, locator="s3://b/maps/a.png", bitmap_mask=None),
        MapResult("b", None, locator="s3://b/maps/b.png", bitmap_mask=None),
        MapResult("b", "other", locator="s3://b/maps/b~other.png", bitmap_mask=None),
    ]
    inferences = [Inference(label="cat"), Inference(label="dog")]
    filled = fill_activation_maps(inferences, ["b", "a"], results)
    assert [f.activation_map.locator for f in filled] == ["s3://b/maps/b.png", "s3://b/maps/a.png"]
    assert [f.label for f in filled] == ["cat", "dog"]
    named = fill_activation_maps(inferences[:1], ["b"], results, name="other")
    assert named[0].activation_map == annotation.BitmapMask(locator="s3://b/maps/b~other.png")


def test_an_inference_whose_map_failed_is_reported_or_kept_as_asked() -> None:
    failed = MapResult.from_failure("a", None, ValueError("bad map"))
    with pytest.raises(MissingMapError, match=r"image 'a' has its map failed: ValueError: bad map"):
        fill_activation_maps([Inference(label="cat")], ["a"], [failed])
    with pytest.raises(MissingMapError, match="no result"):
        fill_activation_maps([Inference(label="cat")], ["zzz"], [failed])
    kept = fill_activation_maps([Inference(label="cat")], ["a"], [failed], missing="keep")
    assert kept[0].activation_map is None
    with pytest.raises(MissingMapError):
        bitmap_mask(failed)


def test_the_kolena_workflow_example_runs_on_the_embedded_default(tmp_path: Path) -> None:
    env = {"ACTMAP_HOME": str(tmp_path / "home")}
    worker = WorkerProcess(env, tmp_path)
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "kolena_workflow.py"), "--count", "4"],
            env={**clean_env(env), "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        worker.stop()
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        png = tmp_path / "home" / "maps" / f"img-{i:03d}.png"
        assert line.startswith(f"s3://my-images/val/img-{i:03d}.jpg -> cat ")
        assert line.endswith(png.as_uri())
        assert png.read_bytes().startswith(b"\x89PNG")
