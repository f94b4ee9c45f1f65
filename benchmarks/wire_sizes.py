"""Bytes per map on the wire and in Redis: ``python -m benchmarks.wire_sizes`` (about 30 s).

For Grad-CAM-like maps (benchmarks.common.gradcam_map) of 224², 512² and 1024², given to the
producer as float32, float16 or uint8 (floats are quantized to rint(x*255) uint8), in one run:

  packed   the map message as ``encode_map`` packs it at ``png_compress_level`` (msgpack; the
           map as Sub-filtered PNG scanlines deflated by ISA-L): what the task carries, per map
  Redis    what kombu's Redis transport stores (base64 body in a JSON envelope): maps published
           with ``Producer.submit_many`` (``batch_size`` 32, synchronous) to a private
           redis-server, then the queue list read back with LRANGE; total bytes / maps

Then, per size: the PNG a worker stores (png_from_scanlines of the decoded message, the same
bytes as render_png at ``png_compress_level``), one map's result as the worker stores it in the
result backend (``MEMORY USAGE`` and ``STRLEN`` of its key, written by ResultStore with expiry),
and the worker CPU of decoding and rendering one map (thread CPU time, median: decode_map, then
png_from_scanlines). Last, the batch sizes the background publisher forms at a GPU's pace
(200 and 1,000 maps/s, 224²) and their bytes per map, and the Redis commands per map through a real worker
(``actmap worker``, one process, local storage; INFO commandstats and redis-server CPU over
2,048 maps) at batch 32 and batch 8. Everything on 127.0.0.1; ``docs/capacity.md`` turns these
figures into sizing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import gradcam_maps, machine, table
from producer import Producer, Settings
from producer.celery_config import make_celery
from producer.intensity import to_intensities
from producer.keys import result_id
from producer.results import success_result
from producer.wire import MapMessage, decode_map, encode_map
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess
from worker.render import png_from_scanlines, render_png

SIZES = (224, 512, 1024)
DTYPES = ("float32", "float16", "uint8")


def as_input(maps: list[np.ndarray], dtype: str) -> list[np.ndarray]:
    if dtype == "uint8":
        return [to_intensities(m) for m in maps]  # a producer that quantized on the GPU already
    return [m.astype(dtype) for m in maps]


def redis_bytes_per_map(
    redis_server: RedisServer, settings: Settings, maps: list[np.ndarray]
) -> tuple[float, int]:
    """Publish ``maps`` with submit_many; return (bytes per map in the queue list, messages)."""
    client = redis_server.client(0)
    client.delete(settings.queue)
    with Producer(settings) as producer:
        producer.submit_many((f"val/img-{i:06d}", m) for i, m in enumerate(maps))
        producer.flush()
    stored = client.lrange(settings.queue, 0, -1)
    client.delete(settings.queue)
    return sum(len(m) for m in stored) / len(maps), len(stored)


def paced_batches(
    redis_server: RedisServer, settings: Settings, maps: list[np.ndarray], rate: float, count: int
) -> tuple[float, float]:
    """Submit ``count`` maps at ``rate``/s via the background publisher: (maps per message, bytes per map)."""
    client = redis_server.client(0)
    client.delete(settings.queue)
    with Producer(settings) as producer:
        start = time.perf_counter()
        for i in range(count):
            while time.perf_counter() < start + i / rate:
                time.sleep(0.0005)
            producer.submit(f"val/img-{i:06d}", maps[i % len(maps)])
        producer.flush()
    stored = client.lrange(settings.queue, 0, -1)
    client.delete(settings.queue)
    return count / len(stored), sum(len(m) for m in stored) / count


def result_memory(
    redis_server: RedisServer, settings: Settings, size: int, png_bytes: int, bulk: int = 10_000
) -> tuple[int, int, float]:
    """One success result as the worker writes it (ResultStore, with expiry).

    Returns its key's MEMORY USAGE and STRLEN, and how much Redis's used_memory grows per result
    over ``bulk`` more (the key's share of the keyspace and expires dicts, allocator rounding).
    """
    from worker.result_store import ResultStore

    app = make_celery(settings, "actmap")
    try:
        backend: Any = app.backend
        store = ResultStore(backend)
        run_id = "0123456789abcdef0123456789abcdef"  # a uuid4().hex, the producer's default run id
        image_id = "val/img-000001"
        rid = result_id(run_id, image_id, None)
        result = success_result(
            image_id=image_id,
            name=None,
            locator=f"s3://actmap-results/maps/{image_id}.png",
            width=size,
            height=size,
            size=png_bytes,
            checksum="md5:" + "0" * 32,
        )
        store.succeeded(rid, result)
        store.flush()
        key = backend.get_key_for_task(rid)
        client = redis_server.client(1)
        usage = int(client.memory_usage(key) or 0)
        length = int(client.strlen(key))
        assert client.ttl(key) > 0, "results are stored with an expiry"
        client.flushdb()
        before = int(client.info("memory")["used_memory"])
        for index in range(bulk):
            other = f"val/img-{index:06d}"
            store.succeeded(result_id(run_id, other, None), {**result, "image_id": other})
        store.flush()
        grown = (int(client.info("memory")["used_memory"]) - before) / bulk
        client.flushdb()
        return usage, length, grown
    finally:
        app.close()


def redis_commands(
    redis_server: RedisServer, root: Path, maps: list[np.ndarray], count: int, batch_size: int
) -> tuple[dict[str, int], float, int]:
    """Redis commands per map through a real worker (1 process, local storage), from INFO commandstats.

    A warm-up batch first (connections, queue declarations), then CONFIG RESETSTAT, ``count`` maps
    with submit_many and one collect after the last submit. Returns (calls per command, redis-server
    CPU seconds, messages): everything on the server in that window, both databases, Celery's events
    and heartbeats included.
    """
    env = {
        "ACTMAP_HOME": str(root / "cmd-home"),
        "ACTMAP_BROKER_URL": redis_server.url(0),
        "ACTMAP_RESULT_BACKEND": redis_server.url(1),
        "ACTMAP_QUEUE": "commands",
        "ACTMAP_BATCH_SIZE": str(batch_size),
        "ACTMAP_STORAGE_URL": (root / "cmd-maps").as_uri(),
    }
    values: dict[str, Any] = {k.removeprefix("ACTMAP_").lower(): v for k, v in env.items()}
    settings = Settings(**values)
    worker = WorkerProcess(env, root, concurrency=1)
    client = redis_server.client(0)
    try:
        with Producer(settings) as producer:
            warm = producer.submit_many((f"warm/{i:06d}", maps[i % len(maps)]) for i in range(2 * batch_size))
            producer.collect(warm, timeout=120)
            client.config_resetstat()
            cpu0 = client.info("cpu")
            handles = producer.submit_many((f"val/img-{i:06d}", maps[i % len(maps)]) for i in range(count))
            producer.collect(handles, timeout=300)
            stats = client.info("commandstats")
            cpu1 = client.info("cpu")
    finally:
        worker.stop()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    cpu = sum(float(cpu1[k]) - float(cpu0[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    return calls, cpu, -(-count // batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.wire_sizes")
    parser.add_argument("--maps", type=int, default=32, help="maps per size (default 32: one batch)")
    parser.add_argument("--command-maps", type=int, default=2048, help="maps per Redis command count")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")

    wire_rows: list[list[object]] = []
    size_rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="actmap-wire-") as home, RedisServer() as redis_server:
        base: dict[str, Any] = {
            "home": Path(home),
            "broker_url": redis_server.url(0),
            "result_backend": redis_server.url(1),
            "background_publish": False,
            "redeliver_buffer_mb": 0,
        }
        defaults = Settings(**base)
        level = defaults.png_compress_level
        for size in SIZES:
            maps = gradcam_maps(size, args.maps)
            for dtype in DTYPES:
                inputs = as_input(maps, dtype)
                packed = [
                    encode_map(MapMessage("run", f"val/img-{i:06d}", None, to_intensities(m)), level=level)
                    for i, m in enumerate(inputs)
                ]
                in_redis, messages = redis_bytes_per_map(redis_server, defaults, inputs)
                wire_rows.append(
                    [
                        f"{size}²",
                        dtype,
                        inputs[0].nbytes,
                        statistics.fmean(map(len, packed)),
                        in_redis,
                        f"{in_redis / maps[0].nbytes:.1%}",
                        f"{len(maps) / messages:.0f}",
                    ]
                )
            intensities = [to_intensities(m) for m in maps]
            payloads = [
                encode_map(MapMessage("run", f"val/img-{i:06d}", None, a), level=level)
                for i, a in enumerate(intensities)
            ]
            decode_ms: list[float] = []
            png_ms: list[float] = []
            pngs: list[bytes] = []
            for payload in payloads * 3:
                t0 = time.thread_time()
                message = decode_map(
                    payload, max_pixels=defaults.max_pixels, max_message_bytes=defaults.max_message_bytes
                )
                t1 = time.thread_time()
                png = png_from_scanlines(message.scanlines, message.colormap, message.fade_low_activation)
                decode_ms.append((t1 - t0) * 1e3)
                png_ms.append((time.thread_time() - t1) * 1e3)
                pngs.append(png)
            pngs = pngs[: len(payloads)]
            assert pngs[0] == render_png(intensities[0], compress_level=level), "not render_png's PNG"
            png_mean = statistics.fmean(map(len, pngs))
            usage, length, bulk = result_memory(redis_server, defaults, size, round(png_mean))
            size_rows.append(
                [
                    f"{size}²",
                    png_mean,
                    min(map(len, pngs)),
                    max(map(len, pngs)),
                    usage,
                    length,
                    statistics.median(decode_ms),
                    statistics.median(png_ms),
                    bulk,
                ]
            )

        maps224 = gradcam_maps(224, 32)
        batch_rows: list[list[object]] = []
        for rate in (200.0, 1000.0):
            per_message, per_map = paced_batches(
                redis_server, Settings(**{**base, "background_publish": True}), maps224, rate, int(rate * 3)
            )
            batch_rows.append([f"{rate:g} maps/s for 3 s", defaults.publish_linger_s, per_message, per_map])
        one, _ = redis_bytes_per_map(redis_server, Settings(**base, batch_size=1), maps224)
        batch_rows.append(["submit_many, batch_size 1", "-", 1.0, one])
        command_runs = [
            (batch, *redis_commands(redis_server, Path(home), maps224, args.command_maps, batch))
            for batch in (32, 8)
        ]

    print(
        f"\nbytes per map on the wire, Grad-CAM-like maps, ISA-L level {level}, batch {defaults.batch_size}\n"
    )
    print(
        table(
            ["size", "input", "input bytes", "packed", "Redis list", "Redis/float32", "maps/msg"],
            wire_rows,
        )
    )
    print(f"\nper map, by size (PNG ISA-L level {level}; result written by ResultStore)\n")
    print(
        table(
            [
                "size",
                "PNG mean",
                "PNG min",
                "PNG max",
                "result MEMORY USAGE",
                "result STRLEN",
                "decode cpu ms",
                "PNG cpu ms",
                "used_memory/result",
            ],
            size_rows,
        )
    )
    print("\nbatches the background publisher forms (224² float32, submit() at a steady pace)\n")
    print(table(["load", "linger s", "maps per message", "Redis bytes/map"], batch_rows))
    print(f"\nRedis commands per map, one worker process, {args.command_maps} maps of 224², local storage\n")
    names = sorted(
        {n for _, calls, _, _ in command_runs for n in calls}, key=lambda n: -command_runs[0][1].get(n, 0)
    )
    rows: list[list[object]] = []
    for name in names:
        rows.append([name, *(calls.get(name, 0) / args.command_maps for _, calls, _, _ in command_runs)])
    rows.append(
        ["all commands", *(sum(calls.values()) / args.command_maps for _, calls, _, _ in command_runs)]
    )
    rows.append(["messages", *(messages / args.command_maps for _, _, _, messages in command_runs)])
    rows.append(["redis-server CPU ms", *(cpu * 1e3 / args.command_maps for _, _, cpu, _ in command_runs)])
    print(table(["per map", *(f"batch {batch}" for batch, _, _, _ in command_runs)], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
