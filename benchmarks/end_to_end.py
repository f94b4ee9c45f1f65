"""Maps per second through the real thing: ``python -m benchmarks.end_to_end`` (about 2 minutes).

One ``actmap worker --concurrency N`` (Celery prefork: a main process and N pool processes) on a
private redis-server (broker and results), storing PNGs in a local folder or in a private
SeaweedFS S3 server; the producer in this process submits 224² float32 Grad-CAM-like maps with
``submit_many`` (``ACTMAP_BATCH_SIZE`` maps per message, default 32), then collects every result.

maps/s     from the first submit to the last result collected (after a warm-up batch).
pure       N / (render_png time per map), render_png timed in this process on the same maps,
           uint8 as the worker receives them, right before each run (the box is noisy): what N
           cores would do doing nothing but render.
CPU ms/map from /proc: the worker's main process and its pool children (utime + stime, and the
           children that exited), the redis-server, the S3 server, and this process (producer).
           "of which main": Celery's main process (consumer, events, pool feeding), the rest is
           the pool. "render/worker CPU" = render time / worker CPU per map: the e2e/pure the
           worker would reach with its cores to itself (here producer and servers share them).
RSS        worker main + pool children, sampled every 0.5 s.

The row "batch 1" runs the first configuration again with one map per Celery message: the
difference is Celery's per-message cost. The last run, 10,000 maps after a 1,000-map warm-up,
checks that the workers' RSS stays flat (``--no-memory`` skips it; the whole default run takes
about 2 minutes on 2 cores).
Everything runs on 127.0.0.1 on the same cores, producer and servers included.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import gradcam_maps, machine, median_ms_per_item, table
from producer import Producer, Settings
from producer.intensity import to_intensities
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from tests.support.workers import WorkerProcess
from worker.render import render_png

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_DISTINCT_MAPS = 64


# -- /proc ---------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def cpu_s(pid: int, *, with_reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), plus its waited-for children's if asked."""
    try:
        fields = _stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # After the ")": state is fields[0], so utime/stime/cutime/cstime are fields[11..14].
    ticks = int(fields[11]) + int(fields[12])
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLOCK_TICKS


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def worker_cpu_s(pid: int) -> tuple[float, float]:
    """(main process, pool processes): the pool's live processes plus those the main one reaped."""
    fields = _stat(pid) if os.path.exists(f"/proc/{pid}/stat") else ["0"] * 15
    main = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    reaped = (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS
    return main, reaped + sum(cpu_s(child) for child in children(pid))


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


class RssSampler:
    """RSS of processes and their children, every ``interval_s``, in a daemon thread."""

    def __init__(self, pids: list[int], interval_s: float = 0.5) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def now_mb(self) -> float:
        return sum(rss_mb(pid) + sum(rss_mb(child) for child in children(pid)) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.now_mb()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mb(self, since: float = 0.0) -> float:
        return max((mb for t, mb in self.samples if t >= since), default=0.0)


# -- runs ----------------------------------------------------------------------------------------


@dataclass
class Config:
    storage: str  # "local", "s3" (boto3) or "s3-obstore" (ACTMAP_S3_CLIENT=obstore)
    processes: int
    batch_size: int
    maps: int
    label: str = ""

    def name(self) -> str:
        return self.label or f"{self.storage}, {self.processes} proc"


@dataclass
class Outcome:
    config: Config
    seconds: float
    worker_cpu_s: float
    main_cpu_s: float
    redis_cpu_s: float
    s3_cpu_s: float
    producer_cpu_s: float
    peak_rss_mb: float
    failed: int
    render_ms: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def maps_per_s(self) -> float:
        return self.config.maps / self.seconds

    def per_map_ms(self, seconds: float) -> float:
        return seconds * 1e3 / self.config.maps


class Bench:
    def __init__(
        self, root: Path, redis: RedisServer, s3: SeaweedS3 | None, level: int, maps: list[Any], pool: str
    ) -> None:
        self.pool = pool
        self.root = root
        self.redis = redis
        self.s3 = s3
        self.level = level
        self.maps = maps
        self._runs = itertools.count(1)

    def env(self, config: Config, index: int) -> dict[str, str]:
        env = {
            "ACTMAP_HOME": str(self.root / f"home-{index}"),
            "ACTMAP_BROKER_URL": self.redis.url(0),
            "ACTMAP_RESULT_BACKEND": self.redis.url(1),
            "ACTMAP_QUEUE": f"bench-{index}",
            "ACTMAP_PNG_COMPRESS_LEVEL": str(self.level),
            "ACTMAP_BATCH_SIZE": str(config.batch_size),
        }
        if config.storage == "local":
            env["ACTMAP_STORAGE_URL"] = (self.root / f"maps-{index}").as_uri()
        else:
            assert self.s3 is not None
            bucket = self.s3.create_bucket()
            env["ACTMAP_STORAGE_URL"] = f"s3://{bucket}/maps"
            env["ACTMAP_S3_ENDPOINT_URL"] = self.s3.endpoint_url
            env.update(self.s3.env())
            if config.storage == "s3-obstore":
                env["ACTMAP_S3_CLIENT"] = "obstore"
        return env

    def items(self, prefix: str, count: int) -> Iterator[tuple[str, Any]]:
        for i in range(count):
            yield f"{prefix}/{i:06d}", self.maps[i % len(self.maps)]

    def run(self, config: Config, *, warmup_maps: int | None = None, memory: bool = False) -> Outcome:
        index = next(self._runs)
        render_ms = pure_render_ms(self.level)
        env = self.env(config, index)
        values = {k.removeprefix("ACTMAP_").lower(): v for k, v in env.items() if k.startswith("ACTMAP_")}
        settings = Settings(**values)
        if self.pool == "prefork":
            workers = [WorkerProcess(env, self.root, concurrency=config.processes)]
        else:  # one worker process per core, each running its maps itself
            workers = [
                WorkerProcess(env, self.root, concurrency=1, extra_args=("--pool", self.pool))
                for _ in range(config.processes)
            ]
        pids = [w.process.pid for w in workers]

        def workers_cpu_s() -> tuple[float, float]:
            main_and_pool = [worker_cpu_s(pid) for pid in pids]
            return sum(m for m, _ in main_and_pool), sum(p for _, p in main_and_pool)

        try:
            with Producer(settings) as producer, RssSampler(pids) as rss:
                warm = warmup_maps or max(64, 4 * config.batch_size * config.processes)
                self._submit_and_collect(producer, f"warm-{index}", warm)
                rss_after_warmup = rss.now_mb()
                redis_pid, s3_pid = self.redis.pid or 0, (self.s3.pid or 0) if self.s3 else 0
                cpu0 = (workers_cpu_s(), cpu_s(redis_pid), cpu_s(s3_pid) if s3_pid else 0.0)
                own0 = time.process_time()
                started_mono = time.monotonic()
                started = time.perf_counter()
                failed = self._submit_and_collect(producer, f"run-{index}", config.maps)
                seconds = time.perf_counter() - started
                own = time.process_time() - own0
                cpu1 = (workers_cpu_s(), cpu_s(redis_pid), cpu_s(s3_pid) if s3_pid else 0.0)
                rss_end = rss.now_mb()
            extra: dict[str, Any] = {}
            if memory:
                during = [mb for t, mb in rss.samples if t >= started_mono]
                extra = {
                    "rss_after_warmup": rss_after_warmup,
                    "rss_peak": max(during, default=rss_end),
                    "rss_end": rss_end,
                    "rss_p10_p50_p90": tuple(
                        float(np.percentile(during, q)) if during else 0.0 for q in (10, 50, 90)
                    ),
                    "samples": len(during),
                }
            return Outcome(
                config,
                seconds,
                sum(cpu1[0]) - sum(cpu0[0]),
                cpu1[0][0] - cpu0[0][0],
                cpu1[1] - cpu0[1],
                cpu1[2] - cpu0[2],
                own,
                rss.peak_mb(since=started_mono),
                failed,
                render_ms,
                extra,
            )
        finally:
            for worker in workers:
                worker.stop()

    def _submit_and_collect(self, producer: Producer, prefix: str, count: int) -> int:
        handles = producer.submit_many(self.items(prefix, count))
        flush = getattr(producer, "flush", None)
        if callable(flush):
            flush()
        results = producer.collect(handles, timeout=max(120.0, count / 20))
        failed = [r for r in results if not r.ok]
        if failed:
            print(f"  {len(failed)} of {count} maps failed; first: {failed[0].error}", file=sys.stderr)
        return len(failed)


def pure_render_ms(level: int) -> float:
    intensities = [to_intensities(m) for m in gradcam_maps(224, 8)]
    times = median_ms_per_item(
        {"render": lambda: [render_png(i, compress_level=level) for i in intensities]}, len(intensities), 31
    )
    return times["render"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.end_to_end", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--maps", type=int, default=2000, help="maps per configuration (default 2000)")
    parser.add_argument("--processes", default="1,2", help="worker pool sizes (default 1,2)")
    parser.add_argument(
        "--storage", default="local,s3", help="local, s3 (boto3), s3-obstore; comma-separated (local,s3)"
    )
    parser.add_argument("--no-batch-1", action="store_true", help="skip the one-map-per-message run")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the 10,000-map RSS run"
    )
    parser.add_argument("--memory-maps", type=int, default=10_000)
    parser.add_argument("--memory-storage", default="local", help="storage of the RSS run: local or s3")
    parser.add_argument("--level", type=int, default=None, help="PNG ISA-L level (default: actmap setting)")
    parser.add_argument(
        "--pool",
        default="prefork",
        help="prefork (default: one worker, --concurrency N) or solo (N workers, --pool solo)",
    )
    args = parser.parse_args(argv)

    defaults = Settings()
    level = defaults.png_compress_level if args.level is None else args.level
    batch = defaults.batch_size
    processes = [int(p) for p in args.processes.split(",") if p]
    storages = [s for s in args.storage.split(",") if s]
    args.memory = args.memory and args.memory_maps > 0
    began = time.perf_counter()
    print(f"machine: {machine()}")
    print(
        f"224² float32 maps ({_DISTINCT_MAPS} distinct, cycled), ACTMAP_BATCH_SIZE {batch}, "
        f"ACTMAP_PNG_COMPRESS_LEVEL {level}, "
        f"upload threads {getattr(defaults, 'upload_threads', '-')}, {args.maps} maps per run, "
        f"pool {args.pool}\n",
        flush=True,
    )
    maps = gradcam_maps(224, _DISTINCT_MAPS)
    need_s3 = any(s.startswith("s3") for s in storages) or (args.memory and args.memory_storage != "local")
    outcomes: list[Outcome] = []
    memory: Outcome | None = None
    with tempfile.TemporaryDirectory(prefix="actmap-e2e-") as tmp, ExitStack() as stack:
        redis = stack.enter_context(RedisServer())
        s3 = stack.enter_context(SeaweedS3()) if need_s3 else None
        bench = Bench(Path(tmp), redis, s3, level, maps, args.pool)
        for storage in storages:
            for count in processes:
                outcomes.append(bench.run(Config(storage, count, batch, args.maps)))
                _progress(outcomes[-1])
        if not args.no_batch_1:
            first = Config(storages[0], processes[0], 1, max(200, args.maps // 2))
            first.label = f"{first.name()}, batch 1"
            outcomes.append(bench.run(first))
            _progress(outcomes[-1])
        if args.memory:
            config = Config(args.memory_storage, max(processes), batch, args.memory_maps, label="")
            config.label = f"{config.name()}, {args.memory_maps:,} maps (RSS)"
            memory = bench.run(config, warmup_maps=1000, memory=True)
            _progress(memory)

    print()
    rows = []
    for outcome in outcomes + ([memory] if memory else []):
        pure = outcome.config.processes * 1e3 / outcome.render_ms
        total = outcome.worker_cpu_s + outcome.redis_cpu_s + outcome.s3_cpu_s + outcome.producer_cpu_s
        rows.append(
            [
                outcome.config.name(),
                outcome.config.maps,
                outcome.maps_per_s,
                outcome.render_ms,
                pure,
                f"{100 * outcome.maps_per_s / pure:.1f}%",
                outcome.per_map_ms(outcome.worker_cpu_s),
                outcome.per_map_ms(outcome.main_cpu_s),
                f"{100 * outcome.render_ms / outcome.per_map_ms(outcome.worker_cpu_s):.0f}%",
                outcome.per_map_ms(outcome.redis_cpu_s),
                outcome.per_map_ms(outcome.s3_cpu_s) if outcome.config.storage != "local" else "-",
                outcome.per_map_ms(outcome.producer_cpu_s),
                outcome.per_map_ms(total),
                outcome.peak_rss_mb,
                outcome.failed,
            ]
        )
    print(
        table(
            [
                "configuration",
                "maps",
                "maps/s",
                "render ms",
                "pure maps/s",
                "e2e/pure",
                "worker CPU ms/map",
                "of which main",
                "render/worker CPU",
                "redis",
                "S3 server",
                "producer",
                "all CPU",
                "worker peak RSS MB",
                "failed",
            ],
            rows,
        )
    )
    _print_batch_cost(outcomes)
    if memory is not None:
        _print_memory(memory)
    else:
        print("\n(RSS over 10,000 maps: skipped, --no-memory)")
    print(f"\n(total {time.perf_counter() - began:.0f} s)")
    return 0


def _progress(outcome: Outcome) -> None:
    print(
        f"  {outcome.config.name()}: {outcome.maps_per_s:.0f} maps/s, worker CPU "
        f"{outcome.per_map_ms(outcome.worker_cpu_s):.2f} ms/map",
        file=sys.stderr,
        flush=True,
    )


def _print_batch_cost(outcomes: list[Outcome]) -> None:
    batch_1 = [o for o in outcomes if o.config.batch_size == 1]
    if not batch_1:
        return
    single = batch_1[0]
    batched = next(
        (
            o
            for o in outcomes
            if o.config.batch_size > 1
            and o.config.storage == single.config.storage
            and o.config.processes == single.config.processes
        ),
        None,
    )
    if batched is None:
        return
    b = batched.config.batch_size
    cpu_1 = single.per_map_ms(single.worker_cpu_s)
    cpu_b = batched.per_map_ms(batched.worker_cpu_s)
    per_message = (cpu_1 - cpu_b) / (1 - 1 / b)
    print(
        f"\nCelery per-message cost (worker CPU, from batch 1 vs batch {b}): "
        f"{per_message:.2f} ms per message, "
        f"{per_message / b:.3f} ms per map at batch {b}; wall: {1e3 / single.maps_per_s:.2f} vs "
        f"{1e3 / batched.maps_per_s:.2f} ms per map"
    )


def _print_memory(outcome: Outcome) -> None:
    extra = outcome.extra
    warm, peak, end = extra["rss_after_warmup"], extra["rss_peak"], extra["rss_end"]
    p10, p50, p90 = extra["rss_p10_p50_p90"]
    growth = 100 * (end - warm) / warm
    peak_growth = 100 * (peak - warm) / warm
    print(
        f"\nworker RSS (main + pool), {outcome.config.name()}, {extra['samples']} samples every 0.5 s:\n"
        f"  after 1,000-map warm-up {warm:.1f} MB; "
        f"during the run p10/p50/p90 {p10:.1f}/{p50:.1f}/{p90:.1f} MB, "
        f"peak {peak:.1f} MB; at the end {end:.1f} MB\n"
        f"  growth after warm-up: end {growth:+.1f}%, peak {peak_growth:+.1f}% "
        f"({'flat: < 10%' if max(growth, peak_growth) < 10 else 'NOT flat: >= 10%'})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
