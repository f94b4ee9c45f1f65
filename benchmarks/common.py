"""What the benchmarks share: Grad-CAM-like maps, the machine's description, medians, tables."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

GRID = 14  # Grad-CAM on VGG16's last conv layer: 14x14 for a 224x224 input


def gradcam_map(size: int, seed: int, grid: int = GRID) -> npt.NDArray[np.float32]:
    """A smooth float32 map in [0, 1]: Gaussian blobs on a grid x grid layer, ReLU, bilinear upsampling.

    That is the shape of a real Grad-CAM: a coarse layer's weighted activations, upsampled to the
    image (half-pixel centres, as cv2.resize and torch's align_corners=False), min-max normalised.
    """
    rng = np.random.default_rng(seed)
    centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
    gy, gx = np.meshgrid(centres, centres, indexing="ij")
    coarse = np.zeros((grid, grid), np.float32)
    for weight in rng.uniform(0.5, 1.0, rng.integers(2, 5)):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        radius = rng.uniform(0.08, 0.2)
        coarse += weight * np.exp(-((gy - cy) ** 2 + (gx - cx) ** 2) / (2 * radius**2))
    coarse += rng.uniform(0.0, 0.05, coarse.shape).astype(np.float32)  # a little background activation
    coarse = np.maximum(coarse - 0.15 * coarse.max(), 0.0)  # ReLU of the weighted sum
    fine = _bilinear(coarse, size)
    low, high = float(fine.min()), float(fine.max())
    normalised = (fine - low) / max(high - low, 1e-12)
    return np.clip(normalised, 0.0, 1.0).astype(np.float32)


def _bilinear(coarse: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    grid = coarse.shape[0]
    position = np.clip((np.arange(size, dtype=np.float64) + 0.5) * grid / size - 0.5, 0, grid - 1)
    lower = np.floor(position).astype(np.intp)
    upper = np.minimum(lower + 1, grid - 1)
    weight = (position - lower).astype(np.float32)
    rows = coarse[:, lower] * (1 - weight) + coarse[:, upper] * weight  # (grid, size)
    return rows[lower, :] * (1 - weight)[:, None] + rows[upper, :] * weight[:, None]


def gradcam_maps(size: int, count: int, first_seed: int = 0) -> list[npt.NDArray[np.float32]]:
    return [gradcam_map(size, first_seed + i) for i in range(count)]


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {model}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}"
    )


def median_ms_per_item(calls: dict[str, Callable[[], object]], items: int, repeats: int) -> dict[str, float]:
    """Median over ``repeats`` of each call's time divided by ``items``, in ms.

    The calls are interleaved (one round of every call per repeat), so a noisy neighbour slows
    them all alike and ratios taken within one run stay fair. One untimed round first; the
    garbage collector is off while timing.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up round, not timed: caches, lazy imports, allocator
        call()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                samples[name].append((time.perf_counter() - started) * 1e3 / items)
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        if value >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def png_idat(png: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG: the deflate stream of its filtered scanlines."""
    position, parts = 8, []
    while position < len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        kind = png[position + 4 : position + 8]
        if kind == b"IDAT":
            parts.append(png[position + 8 : position + 8 + length])
        position += 12 + length
    return b"".join(parts)
