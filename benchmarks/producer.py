"""What the GPU loop pays per map: ``python -m benchmarks.producer``.

Blocking time of ``submit`` at an offered load (a GPU's pace), with the background
publisher thread (the default) and with synchronous publishing — a plain Celery
``send_task`` of the same packed map per call — measured in the same run against a private
Redis on loopback; per-map time of ``submit_many``; bytes per map in the broker.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from producer import Producer, Settings
from producer.intensity import to_intensities
from tests.support.redis_server import RedisServer


def gradcam_like(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    cam = np.zeros((size, size))
    for _ in range(3):
        cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.15)
        cam += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    return (cam / cam.max()).astype(np.float32)


# What the loop does between maps: "idle" sleeps (a thread that, on this VM, wakes up with cold
# caches and a slow vCPU: everything runs several times slower for a while); "python" spins in
# Python, holding the GIL (a loop preparing its next batch in Python); "native" keeps the CPU
# busy in native code that releases the GIL, as a GPU loop does in torch's operators and CUDA
# waits (here small BLAS matrix products).
BETWEEN = {"idle": "idle", "python": "spinning in Python", "native": "busy in native code (GIL free)"}
_NATIVE = np.random.default_rng(1).random((96, 96), dtype=np.float32)


THREAD = "submit, publisher thread"
PLAIN = "plain Celery send_task per map"


def paced_calls(
    call: Callable[[int], object], count: int, rate: float, *, between: str = "idle"
) -> list[float]:
    """Call ``call(i)`` ``count`` times at ``rate`` per second; return each call's time in ms."""
    blocked: list[float] = []
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        while (now := time.perf_counter()) < due:
            if between == "idle":
                time.sleep(min(due - now, 0.001))
            elif between == "native":
                np.dot(_NATIVE, _NATIVE)
        t0 = time.perf_counter()
        call(i)
        blocked.append((time.perf_counter() - t0) * 1e3)
    return blocked


def paced_submits(
    producer: Producer, maps: list[np.ndarray], count: int, rate: float, *, between: str = "idle"
) -> list[float]:
    """Submit ``count`` maps at ``rate`` per second; return each call's blocking time in ms."""
    return paced_calls(
        lambda i: producer.submit(f"bench/{i:06d}", maps[i % len(maps)]), count, rate, between=between
    )


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return (
        statistics.median(ordered),
        ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        ordered[-1],
    )


def broker_bytes_per_map(redis_server: RedisServer, queue: str, maps: int) -> float:
    client = redis_server.client(0)
    total = sum(len(m) for m in client.lrange(queue, 0, -1))
    client.delete(queue)
    return total / maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--maps", type=int, default=2000, help="maps per paced run")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    maps = [gradcam_like(rng, args.size) for _ in range(32)]
    quantize_ms = {kind: _quantize_ms(cam) for kind, cam in _in_each_library(maps[0]).items()}

    rows: list[tuple[str, str]] = []
    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as home:
        base = {"home": Path(home), "broker_url": redis_server.url(0), "result_backend": redis_server.url(1)}
        figures: dict[str, tuple[float, float, float]] = {}
        for what, rate, between in [
            (THREAD, 200.0, "idle"),
            (PLAIN, 200.0, "idle"),
            (THREAD, 200.0, "python"),
            (PLAIN, 200.0, "python"),
            (THREAD, 200.0, "native"),
            (PLAIN, 200.0, "native"),
            (THREAD, 2000.0, "python"),
        ]:
            settings = Settings(**base, background_publish=what != PLAIN)
            with Producer(settings) as producer:
                paced_submits(producer, maps, 100, rate)  # warm up connections and caches
                producer.flush()
                redis_server.client(0).delete(settings.queue)
                blocked = paced_submits(producer, maps, args.maps, rate, between=between)
                producer.flush()
            label = f"{what} @ {rate:g}/s, loop {BETWEEN[between]}"
            figures[label] = percentiles(blocked)
            wire = broker_bytes_per_map(redis_server, settings.queue, args.maps)
            if between == "idle":
                rows.append((f"broker bytes per map ({label})", f"{wire:,.0f}"))
        # The machine's share: quantizing alone, paced the same way (no producer, no thread).
        for between in BETWEEN:
            alone = paced_calls(
                lambda i: to_intensities(maps[i % len(maps)]), args.maps, 200.0, between=between
            )
            figures[f"to_intensities alone @ 200/s, loop {BETWEEN[between]}"] = percentiles(alone)
        with Producer(Settings(**base)) as producer:
            items = [(f"many/{i:06d}", maps[i % len(maps)]) for i in range(args.maps)]
            t0 = time.perf_counter()
            producer.submit_many(items)
            submit_many_ms = (time.perf_counter() - t0) * 1e3 / args.maps
            producer.flush()
            flushed_ms = (time.perf_counter() - t0) * 1e3 / args.maps

    print(f"\nproducer, {args.size}x{args.size} float32 maps, {args.maps} per run, Redis on loopback\n")
    print(f"| {'per submit call (ms)':<78} | {'p50':>6} | {'p99':>6} | {'max':>6} |")
    print(f"|{'-' * 80}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for label, (p50, p99, worst) in figures.items():
        print(f"| {label:<78} | {p50:6.3f} | {p99:6.3f} | {worst:6.2f} |")
    for between in BETWEEN.values():
        plain = figures[f"{PLAIN} @ 200/s, loop {between}"][0]
        background = figures[f"{THREAD} @ 200/s, loop {between}"][0]
        rows.append(
            (f"plain send_task p50 / submit p50 @ 200/s, loop {between}", f"{plain / background:.1f}x")
        )
    rows += [
        ("submit_many, ms per map (returns)", f"{submit_many_ms:.3f}"),
        ("submit_many, ms per map (until all published)", f"{flushed_ms:.3f}"),
        *((f"quantize alone (to_intensities), {kind}, ms", f"{ms:.3f}") for kind, ms in quantize_ms.items()),
    ]
    print()
    for label, value in rows:
        print(f"| {label:<96} | {value:>10} |")


def _quantize_ms(cam: object) -> float:
    return statistics.median(_time_ms(lambda: to_intensities(cam)) for _ in range(200))


def _in_each_library(cam: np.ndarray) -> dict[str, object]:
    """The map as numpy has it, and as a JAX array and a torch tensor (on the CPU) where installed."""
    forms: dict[str, object] = {"numpy array": cam}
    try:
        import jax.numpy as jnp

        forms["JAX array (CPU)"] = jnp.asarray(cam)
    except ImportError:
        pass
    try:
        import torch

        forms["torch tensor (CPU)"] = torch.from_numpy(cam)
    except ImportError:
        pass
    return forms


def _time_ms(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    main()
