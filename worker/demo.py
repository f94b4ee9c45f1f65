"""``actmap demo``: the whole trip on one machine, with nothing to configure.

Makes a few synthetic images and Grad-CAM-like maps (a coarse 14x14 grid of activations
around the objects, upsampled bilinearly, as Grad-CAM's last conv layer gives), starts a
worker, submits the maps, collects the results and writes overlays to look at.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

import numpy as np
from PIL import Image

from producer.client import Producer
from producer.results import MapResult
from producer.settings import Settings
from worker.gallery import write_gallery

GRID = 14  # Grad-CAM on VGG16's last conv layer: 14x14 for a 224x224 input
_OBJECT_COLOURS = np.array(
    [[230, 60, 50], [250, 210, 40], [60, 90, 230], [240, 240, 240], [30, 30, 30]], np.float32
)


def synthetic_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with two or three blobs on a textured background, and a map that is hot on them."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 140, 3).astype(np.float32)
    image = base + 40 * np.sin(6 * np.pi * (xx + rng.uniform()))[..., None] * np.array([0.3, 0.5, 0.2])
    gy, gx = (np.mgrid[0:GRID, 0:GRID].astype(np.float32) + 0.5) / GRID
    coarse = np.zeros((GRID, GRID), np.float32)
    for weight in rng.uniform(0.5, 1.0, rng.integers(2, 4)):
        cy, cx, radius = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.16)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[inside] = _OBJECT_COLOURS[rng.integers(len(_OBJECT_COLOURS))]
        coarse += weight * np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * radius**2))
    coarse = np.maximum(coarse - 0.15 * coarse.max(), 0)  # ReLU after the weighted sum, as Grad-CAM does
    cam = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    cam = (cam - cam.min()) / max(float(cam.max() - cam.min()), 1e-6)
    return np.clip(image, 0, 255).astype(np.uint8), cam.astype(np.float32)


def overlay(image: np.ndarray, png_path: Path) -> Image.Image:
    """The map over its image, scaled to it, as Kolena shows a BitmapMask."""
    base = Image.fromarray(image).convert("RGBA")
    mask = Image.open(png_path).convert("RGBA")
    if mask.size != base.size:
        mask = mask.resize(base.size, Image.Resampling.BILINEAR)
    return Image.alpha_composite(base, mask)


def run_demo(*, count: int, size: int, echo: Callable[[str], None]) -> list[MapResult]:
    settings = Settings()
    folder = settings.resolved_home / "demo"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "overlays").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    scenes = {f"demo-{i:03d}": synthetic_scene(rng, size) for i in range(count)}
    for image_id, (image, _) in scenes.items():
        Image.fromarray(image).save(folder / "images" / f"{image_id}.jpg", quality=92)

    started = time.monotonic()
    worker = _start_worker(folder / "worker.log")
    try:
        with Producer(settings) as producer:
            echo(f"run {producer.run_id}: submitting {count} maps of {size}x{size} to {_where(settings)}")
            handles = [producer.submit(image_id, cam) for image_id, (_, cam) in scenes.items()]
            results = producer.collect(handles, timeout=60)
    finally:
        _stop_worker(worker)
    for result in results:
        echo(f"  {result.image_id}: {result.locator if result.ok else result.error}")
        if result.ok and result.locator and result.locator.startswith("file://"):
            png = Path(url2pathname(urlsplit(result.locator).path))
            overlay(scenes[result.image_id][0], png).save(folder / "overlays" / f"{result.image_id}.png")
    echo(f"done in {time.monotonic() - started:.1f} s")
    echo(f"images:   {folder / 'images'}")
    echo(f"overlays: {folder / 'overlays'} (each map over its image, as Kolena shows it)")
    echo(f"worker log: {folder / 'worker.log'}")
    gallery = write_gallery(folder / "gallery.html", [r.to_dict() for r in results], folder / "images")
    echo(f"gallery:  {gallery} (open it in a browser)")
    return results


def _where(settings: Settings) -> str:
    return "the embedded broker" if settings.uses_filesystem_broker() else "the broker"


def _start_worker(log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "worker.cli", "worker", "--concurrency", "2", "--loglevel", "INFO"]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)  # warm shutdown: finishes what it holds
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
