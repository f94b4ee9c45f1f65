"""Prometheus metrics of a worker, summed over its pool processes.

Celery's prefork pool runs maps in child processes, so the metrics use prometheus_client's
multiprocess mode: each process writes its values to files in one folder
(``PROMETHEUS_MULTIPROC_DIR``, set by ``actmap worker --metrics-port`` before
prometheus_client is first imported), and the main process serves their sum. Without that
folder the metrics still count, per process, and nothing serves them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

MAPS = Counter("actmap_maps", "Maps finished by this worker, by outcome (done, failed).", ["outcome"])
RETRIES = Counter("actmap_retries", "Maps whose PUT failed and that were sent back to retry later.")
STAGE_SECONDS = Histogram(
    "actmap_stage_seconds",
    "Time one map spends in each stage: render (decode, validate, colorize, PNG), store, result.",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
IN_FLIGHT = Gauge("actmap_maps_in_flight", "Maps received and not yet finished.", multiprocess_mode="livesum")


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Serve the sum over all processes on ``http://address:port/metrics``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=address, registry=registry)


def process_exited(pid: int) -> None:
    """Drop a dead pool process's live gauges (its counters stay counted)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
