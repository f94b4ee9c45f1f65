"""What a batch costs the caller: ``python -m benchmarks.batch``.

The caller's time per map of one ``submit_batch`` of 32 224x224 float32 maps against 32
``submit`` calls of the same maps, as a numpy array and as a CPU torch tensor (where torch is
installed), with the background publisher (the default) and a private Redis on loopback. Each
round is flushed and the queue emptied before the next, untimed, so each timed call starts
with an idle publisher; the calls are interleaved round by round, so a noisy neighbour slows
them all alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import gradcam_maps, machine, table
from producer import Producer, Settings
from tests.support.redis_server import RedisServer


def batches(count: int, size: int) -> dict[str, object]:
    """The batch as a numpy array, and as a CPU torch tensor where torch is installed."""
    maps = np.stack(gradcam_maps(size, count))
    forms: dict[str, object] = {"numpy": maps}
    try:
        import torch

        forms["torch (CPU)"] = torch.from_numpy(maps)
    except ImportError:
        pass
    return forms


def calls(producer: Producer, maps: object, count: int) -> dict[str, Callable[[], object]]:
    ids = [f"bench/{i:03d}" for i in range(count)]
    return {
        "submit": lambda: [producer.submit(image_id, maps[i]) for i, image_id in enumerate(ids)],  # type: ignore[index]
        "submit_batch": lambda: producer.submit_batch(ids, maps),
    }


def ms_per_map(
    producer: Producer, server: RedisServer, timed: dict[str, Callable[[], object]], count: int, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` of each call's time divided by ``count``; one untimed round first."""
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(rounds + 1):
        for name, call in timed.items():
            gc.disable()
            started = time.perf_counter()
            call()
            elapsed = time.perf_counter() - started
            gc.enable()
            producer.flush()
            server.client(0).delete(producer.settings.queue)
            if round_index:
                samples[name].append(elapsed * 1e3 / count)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--maps", type=int, default=32, help="maps per batch")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    rows = []
    with RedisServer() as server, tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), broker_url=server.url(0), result_backend=server.url(1))
        with Producer(settings) as producer:
            for form, maps in batches(args.maps, args.size).items():
                figures = ms_per_map(
                    producer, server, calls(producer, maps, args.maps), args.maps, args.rounds
                )
                single, batch = figures["submit"], figures["submit_batch"]
                rows.append((form, single, batch, f"{single / batch:.1f}x"))
    print(f"\n{machine()}")
    print(f"{args.maps} maps of {args.size}x{args.size} float32, median of {args.rounds} rounds\n")
    print(table(["maps as", f"{args.maps} submit, ms/map", "submit_batch, ms/map", "ratio"], rows))


if __name__ == "__main__":
    main()
