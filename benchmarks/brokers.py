"""Redis vs RabbitMQ as the broker: ``python -m benchmarks.brokers`` (under 2 minutes).

224² float32 Grad-CAM-like maps (benchmarks.common), results in a private redis-server in both
cases, PNGs in a local folder, one ``actmap worker --concurrency 2`` per run. The broker is either
that redis-server (db 0) or the machine's RabbitMQ (127.0.0.1:5672) in a fresh vhost, deleted at
the end; with RabbitMQ actmap's AMQP config applies (quorum queue, topic exchange, confirmed
publishes). Both brokers are measured in the same run, interleaved (R, Q, Q, R, ...), so a busy
machine slows them alike and the ratios stay fair.

maps/s      ``submit_many`` of N maps (default 2,000), from the first submit to the last result
            collected, after a warm-up batch; the median over the rounds.
bytes/map   with no worker running, 64 maps published with ``submit_many``; Redis: the queue
            list's LRANGE bytes (kombu's JSON envelope with the base64 body); RabbitMQ: the
            queue's ``message_bytes`` from ``rabbitmqctl list_queues`` (message bodies only, no
            AMQP properties or headers).
submit p50/p99  blocking time of each ``submit`` (background publisher, the default) at
            200 maps/s for 600 maps, loop sleeping between maps, no worker running.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import amqp
import numpy as np

from benchmarks.common import gradcam_maps, machine, table
from benchmarks.producer import paced_submits, percentiles
from producer import Producer, Settings
from tests.support.rabbitmq import HOST as RABBIT_HOST
from tests.support.rabbitmq import PASSWORD as RABBIT_PASSWORD
from tests.support.rabbitmq import PORT as RABBIT_PORT
from tests.support.rabbitmq import USER as RABBIT_USER
from tests.support.rabbitmq import RabbitVhost, rabbitmqctl, unavailable_reason
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess

_DISTINCT_MAPS = 64
BROKERS = ("Redis", "RabbitMQ")


class Bench:
    def __init__(self, root: Path, redis: RedisServer, vhost: RabbitVhost, maps: list[np.ndarray]) -> None:
        self.root = root
        self.redis = redis
        self.vhost = vhost
        self.maps = maps
        self._runs = itertools.count(1)
        self.rabbit_bytes_source = "-"

    def env(self, broker: str, tag: str) -> dict[str, str]:
        index = next(self._runs)
        url = self.redis.url(0) if broker == "Redis" else self.vhost.url
        return {
            "ACTMAP_HOME": str(self.root / f"home-{index}"),
            "ACTMAP_BROKER_URL": url,
            "ACTMAP_RESULT_BACKEND": self.redis.url(1),
            "ACTMAP_QUEUE": f"{tag}-{index}",
            "ACTMAP_STORAGE_URL": (self.root / f"maps-{index}").as_uri(),
        }

    @staticmethod
    def settings(env: dict[str, str], **overrides: Any) -> Settings:
        values: dict[str, Any] = {k.removeprefix("ACTMAP_").lower(): v for k, v in env.items()}
        return Settings(**values, **overrides)

    def items(self, prefix: str, count: int) -> Any:
        for i in range(count):
            yield f"{prefix}/{i:06d}", self.maps[i % len(self.maps)]

    def throughput(self, broker: str, count: int) -> float:
        """maps/s of submit_many + collect through one ``actmap worker --concurrency 2``."""
        env = self.env(broker, "e2e")
        worker = WorkerProcess(env, self.root, concurrency=2)
        try:
            with Producer(self.settings(env)) as producer:
                self._submit_and_collect(producer, "warm", 128)
                started = time.perf_counter()
                failed = self._submit_and_collect(producer, "run", count)
                seconds = time.perf_counter() - started
        finally:
            worker.stop()
        if failed:
            raise RuntimeError(f"{broker}: {failed} of {count} maps failed (see {worker.log_path})")
        return count / seconds

    def _submit_and_collect(self, producer: Producer, prefix: str, count: int) -> int:
        handles = producer.submit_many(self.items(prefix, count))
        producer.flush()
        results = producer.collect(handles, timeout=max(120.0, count / 20))
        return sum(1 for r in results if not r.ok)

    def bytes_per_map(self, broker: str, count: int = 64) -> tuple[float, int]:
        """(broker bytes per map, messages) of ``count`` maps published with no worker running."""
        env = self.env(broker, "bytes")
        settings = self.settings(env, background_publish=False)
        with Producer(settings) as producer:
            producer.submit_many(self.items("bytes", count))
            producer.flush()
        if broker == "Redis":
            client = self.redis.client(0)
            try:
                stored = client.lrange(settings.queue, 0, -1)
                client.delete(settings.queue)
            finally:
                client.close()
            return sum(map(len, stored)) / count, len(stored)
        messages, body_bytes = self._rabbit_queue(settings.queue)
        return body_bytes / count, messages

    def _rabbit_queue(self, queue: str) -> tuple[int, int]:
        """(messages, body bytes) in ``queue``: ``message_bytes`` if the server reports it, else the bodies.

        Quorum queues leave ``message_bytes`` empty in ``rabbitmqctl list_queues`` on some RabbitMQ
        versions; then every message is fetched (basic.get) and its body measured, which is what
        ``message_bytes`` counts.
        """
        deadline = time.monotonic() + 15  # list_queues counters lag by the stats interval (~5 s)
        while True:
            out = rabbitmqctl(
                "list_queues",
                "-p",
                self.vhost.name,
                "--no-table-headers",
                "name",
                "messages",
                "message_bytes",
            )
            rows = [line.split("\t") for line in out.splitlines() if line.strip()]
            row = next((r for r in rows if len(r) == 3 and r[0] == queue), None)
            if row is not None and row[1].strip() not in ("", "0") and row[2].strip() not in ("", "0"):
                rabbitmqctl("purge_queue", "-p", self.vhost.name, queue)
                self.rabbit_bytes_source = "message_bytes"
                return int(row[1]), int(row[2])
            if (row is not None and row[1].strip() not in ("", "0")) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        messages, total = 0, 0
        with amqp.Connection(
            f"{RABBIT_HOST}:{RABBIT_PORT}", userid=RABBIT_USER, password=RABBIT_PASSWORD,
            virtual_host=self.vhost.name,
        ) as connection:  # fmt: skip
            channel = connection.channel()
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                messages += 1
                total += len(message.body)
        self.rabbit_bytes_source = "basic.get bodies (message_bytes empty)"
        return messages, total

    def blocking(self, broker: str, count: int, rate: float) -> tuple[float, float]:
        """p50 and p99 of submit()'s blocking time, ms, at ``rate`` maps/s (background publisher)."""
        env = self.env(broker, "paced")
        settings = self.settings(env)
        with Producer(settings) as producer:
            paced_submits(producer, self.maps, 100, rate)  # warm up connections and caches
            producer.flush()
            blocked = paced_submits(producer, self.maps, count, rate)
            producer.flush()
        p50, p99, _ = percentiles(blocked)
        if broker == "Redis":
            client = self.redis.client(0)
            client.delete(settings.queue)
            client.close()
        else:
            rabbitmqctl("delete_queue", "-p", self.vhost.name, settings.queue)
        return p50, p99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.brokers", description=__doc__.split("\n")[0])
    parser.add_argument("--maps", type=int, default=2000, help="maps per throughput run (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="throughput runs per broker (default 2)")
    parser.add_argument("--paced-maps", type=int, default=600, help="maps per paced submit run")
    parser.add_argument("--rate", type=float, default=200.0, help="paced submit rate, maps/s")
    args = parser.parse_args(argv)

    reason = unavailable_reason()
    if reason is not None:
        print(f"RabbitMQ unavailable: {reason}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    defaults = Settings()
    print(f"machine: {machine()}")
    print(
        f"224² float32 maps ({_DISTINCT_MAPS} distinct, cycled), batch {defaults.batch_size}, "
        "one worker --concurrency 2, local storage, results in Redis\n",
        flush=True,
    )
    maps = gradcam_maps(224, _DISTINCT_MAPS)
    rates: dict[str, list[float]] = {b: [] for b in BROKERS}
    sizes: dict[str, tuple[float, int]] = {}
    paced: dict[str, list[tuple[float, float]]] = {b: [] for b in BROKERS}
    with (
        tempfile.TemporaryDirectory(prefix="actmap-brokers-") as tmp,
        RedisServer() as redis,
        RabbitVhost() as vhost,
    ):
        bench = Bench(Path(tmp), redis, vhost, maps)
        for broker in BROKERS:
            sizes[broker] = bench.bytes_per_map(broker)
        for round_ in range(args.rounds):
            order = BROKERS if round_ % 2 == 0 else BROKERS[::-1]
            for broker in order:
                paced[broker].append(bench.blocking(broker, args.paced_maps, args.rate))
            for broker in order:
                rates[broker].append(bench.throughput(broker, args.maps))
                print(f"  {broker}: {rates[broker][-1]:.0f} maps/s", file=sys.stderr, flush=True)

    def p(broker: str, which: int) -> float:
        return statistics.median(run[which] for run in paced[broker])

    values = {
        "maps/s end to end (median)": {b: statistics.median(rates[b]) for b in BROKERS},
        "broker bytes per map": {b: sizes[b][0] for b in BROKERS},
        f"submit p50 ms @ {args.rate:g}/s": {b: p(b, 0) for b in BROKERS},
        f"submit p99 ms @ {args.rate:g}/s": {b: p(b, 1) for b in BROKERS},
    }
    rows = [
        [name, v["Redis"], v["RabbitMQ"], f"{v['RabbitMQ'] / v['Redis']:.2f}"] for name, v in values.items()
    ]
    print(
        f"\n{args.maps} maps per throughput run, {args.rounds} rounds per broker interleaved; "
        f"bytes from {sizes['Redis'][1]} / {sizes['RabbitMQ'][1]} messages of 64 maps; "
        f"{args.paced_maps} paced maps per run\n"
    )
    print(table(["per map", "Redis", "RabbitMQ", "RabbitMQ/Redis"], rows))
    runs = "; ".join(f"{b} " + ", ".join(f"{r:.0f}" for r in rates[b]) for b in BROKERS)
    print(f"\nmaps/s per run: {runs}; RabbitMQ bytes from {bench.rabbit_bytes_source}")
    print(f"(total {time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
