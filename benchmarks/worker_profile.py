"""Where a worker's time goes per map: ``python -m benchmarks.worker_profile`` (about 30 s).

In this process, on 224² Grad-CAM-like maps packed exactly as the producer sends them
(``encode_map``: the map as Sub-filtered PNG scanlines deflated at ``png_compress_level``),
each stage of a worker's per-map work is timed on its own, wall clock and CPU time of the
calling thread, map after map (stages interleaved):

  decode   decode_map: msgpack, inflate of the scanlines, checks; result id and object key
  render   png_from_scanlines: the PNG's chunks around the IDAT the producer deflated
  store    FileStorage.put into a temporary folder, and S3Storage.put (boto3) and
           ObstoreS3Storage.put (ACTMAP_S3_CLIENT=obstore) to a private SeaweedFS
  log      the INFO line per map of ACTMAP_LOG_EACH_MAP, through Celery's worker logging to a file
  metrics  the Prometheus updates pipeline and task make per map (in memory: no --metrics-port)
  result   ResultStore.succeeded (SETs with expiry, pipelined: a round trip per 16 maps or 20 ms)
           and Celery's backend.mark_as_done (GET, then SET + PUBLISH), on a private redis-server;
           and, for comparison, one pipelined round trip of SETs per batch of ``batch_size`` maps

then the whole ``Pipeline.process_batch`` per batch (render + upload threads), per map. Celery's
per-message cost is not in here: ``benchmarks.end_to_end`` measures it (batch 1 vs batch 32).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import gradcam_maps, machine, table
from producer.celery_config import make_celery
from producer.intensity import to_intensities
from producer.keys import object_key, result_id
from producer.results import success_result
from producer.settings import Settings
from producer.wire import MapMessage, Scanlines, decode_map, encode_map
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from worker import metrics
from worker.pipeline import Done, Pipeline
from worker.render import png_from_scanlines
from worker.result_store import ResultStore
from worker.storage import FileStorage, S3Storage, StorageLocation, open_storage

log = logging.getLogger("actmap.worker")  # the pipeline's logger


class Stage:
    """Wall and thread-CPU samples of one stage, in ms."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def time(self, call: Callable[[], Any]) -> Any:
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        value = call()
        self.wall.append((time.perf_counter() - wall0) * 1e3)
        self.cpu.append((time.thread_time() - cpu0) * 1e3)
        return value

    def row(self, name: str, note: str = "") -> list[object]:
        return [
            name,
            statistics.median(self.wall),
            statistics.fmean(self.wall),
            statistics.median(self.cpu),
            statistics.fmean(self.cpu),
            note,
        ]


def packed_maps(settings: Settings, run_id: str, count: int, distinct: int) -> list[bytes]:
    """``count`` map messages as the producer sends them: quantized, then ``encode_map``."""
    arrays = [to_intensities(m) for m in gradcam_maps(224, distinct)]
    return [
        encode_map(
            MapMessage(run_id, f"profile/{i:06d}", None, arrays[i % distinct]),
            level=settings.png_compress_level,
        )
        for i in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_profile")
    parser.add_argument("--maps", type=int, default=1000, help="maps per pass (default 1000)")
    parser.add_argument("--no-s3", action="store_true", help="skip SeaweedFS")
    parser.add_argument(
        "--level", type=int, default=None, help="PNG ISA-L level 0-3 (default: actmap setting)"
    )
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="actmap-profile-") as tmp, RedisServer() as redis:
        root = Path(tmp)
        overrides: dict[str, Any] = {
            "home": root / "home",
            "broker_url": redis.url(0),
            "result_backend": redis.url(1),
            "storage_url": (root / "maps").as_uri(),
        }
        if args.level is not None:
            overrides["png_compress_level"] = args.level
        settings = Settings(**overrides)
        app = make_celery(settings, "actmap")
        # The worker's logging: Celery's setup (INFO, its format) writing to a file, as a worker's stderr.
        app.log.setup_logging_subsystem(
            loglevel=logging.INFO, logfile=str(root / "worker.log"), colorize=False
        )
        backend: Any = app.backend
        result_store = ResultStore(backend)
        local = FileStorage(root / "maps")
        s3_server = None if args.no_s3 else SeaweedS3().start()
        try:
            s3_location = s3_obstore = s3_lean = None
            if s3_server is not None:
                os.environ.update(s3_server.env())
                bucket = s3_server.create_bucket()
                s3_settings = Settings(
                    **{
                        **overrides,
                        "storage_url": f"s3://{bucket}/maps",
                        "s3_endpoint_url": s3_server.endpoint_url,
                    }
                )
                s3_location = open_storage(s3_settings)
                s3_obstore = open_storage(s3_settings.model_copy(update={"s3_client": "obstore"}))
                s3_lean = _s3_without_crc32(s3_settings, bucket)
            print(
                f"224² maps, PNG level {settings.png_compress_level}, "
                f"batch {settings.batch_size}, {args.maps} maps per pass\n"
            )
            stages = _profile_stages(
                settings, backend, result_store, local, s3_location, s3_obstore, s3_lean, args.maps
            )
            batches = _profile_batches(settings, local, s3_location, s3_obstore, args.maps)
        finally:
            if s3_server is not None:
                s3_server.stop()
            app.close()

    rows = [stage.row(name, note) for name, (stage, note) in stages.items()]
    print("per map, ms (wall = elapsed; cpu = this thread's CPU time)")
    print(table(["stage", "wall median", "wall mean", "cpu median", "cpu mean", "what"], rows))
    print("\nwhole Pipeline.process_batch (decode, render, upload threads), per map")
    print(table(["storage", "wall ms/map", "process cpu ms/map", "maps/s one process"], batches))
    return 0


def _profile_stages(
    settings: Settings,
    backend: Any,
    result_store: ResultStore,
    local: FileStorage,
    s3: StorageLocation | None,
    s3_obstore: StorageLocation | None,
    s3_lean: S3Storage | None,
    count: int,
) -> dict[str, tuple[Stage, str]]:
    run_id = f"profile-{os.getpid()}"
    payloads = packed_maps(settings, run_id, count, distinct=16)
    stages: dict[str, tuple[Stage, str]] = {
        "decode": (Stage(), "msgpack + inflate + checks, result id, object key"),
        "render": (Stage(), "png_from_scanlines: IHDR, PLTE, tRNS and CRCs around the IDAT"),
        "store local": (Stage(), "FileStorage.put (tmp file, write, rename)"),
    }
    if s3 is not None:
        stages["store S3"] = (Stage(), "S3Storage.put to SeaweedFS on loopback (boto3, Content-MD5)")
    if s3_obstore is not None:
        stages["store S3, obstore"] = (Stage(), "ObstoreS3Storage.put, same server (x-amz-checksum-sha256)")
    if s3_lean is not None:
        stages["store S3, no CRC32"] = (Stage(), "same, boto3 request_checksum_calculation=when_required")
    stages["log"] = (Stage(), "ACTMAP_LOG_EACH_MAP's INFO line per map, Celery's handler, to a file")
    stages["metrics"] = (Stage(), "worker.metrics per map: 3 histogram observations, 2 counters")
    stages["result: ResultStore"] = (
        Stage(),
        "worker.result_store: SETs with expiry, a round trip per 16 maps or 20 ms",
    )
    stages["result: mark_as_done"] = (Stage(), "Celery's path: GET, then SETEX + PUBLISH")
    stages["result: pipelined/batch"] = (Stage(), f"one round trip of {settings.batch_size} SETs, per map")

    pending: list[tuple[str, dict[str, Any]]] = []
    client = backend.client
    for index, payload in enumerate(payloads):
        message = stages["decode"][0].time(lambda payload=payload: _decode(settings, payload))
        rid, key, scanlines = message
        png = stages["render"][0].time(lambda scanlines=scanlines: png_from_scanlines(scanlines))
        stored = stages["store local"][0].time(lambda key=key, png=png: local.put(key, png))
        if s3 is not None:
            s3_key = object_key(s3.prefix, f"profile/{index:06d}")
            stages["store S3"][0].time(lambda k=s3_key, png=png: s3.storage.put(k, png))
        if s3_obstore is not None:
            ob_key = object_key("obstore", f"profile/{index:06d}")
            stages["store S3, obstore"][0].time(lambda k=ob_key, png=png: s3_obstore.storage.put(k, png))
        if s3_lean is not None:
            lean_key = object_key("lean", f"profile/{index:06d}")
            stages["store S3, no CRC32"][0].time(lambda k=lean_key, png=png: s3_lean.put(k, png))
        stages["log"][0].time(
            lambda index=index, stored=stored, rid=rid: log.info(
                "map %r stored at %s (%d bytes, render %.1f ms, store %.1f ms)",
                f"profile/{index:06d}",
                stored.locator,
                stored.size,
                0.2,
                0.1,
                extra={"image_id": f"profile/{index:06d}", "map_name": None, "result_id": rid},
            )
        )
        stages["metrics"][0].time(_metrics_per_map)
        result = success_result(
            image_id=f"profile/{index:06d}",
            name=None,
            locator=stored.locator,
            width=224,
            height=224,
            size=stored.size,
            checksum=stored.checksum,
        )
        stages["result: ResultStore"][0].time(lambda rid=rid, r=result: result_store.succeeded(rid, r))
        stages["result: mark_as_done"][0].time(lambda rid=rid, r=result: backend.mark_as_done(rid + "-m", r))
        pending.append((rid + "-p", result))
        if len(pending) == settings.batch_size or index == len(payloads) - 1:
            stage = stages["result: pipelined/batch"][0]
            stage.time(lambda batch=list(pending): _pipelined_set(backend, client, batch))
            # One sample per batch: spread it over the batch's maps.
            for samples in (stage.wall, stage.cpu):
                samples[-1] /= len(pending)
            pending.clear()
    return stages


def _metrics_per_map() -> None:
    """What pipeline and task record per map (no --metrics-port: in memory)."""
    metrics.IN_FLIGHT.inc(1)
    metrics.STAGE_SECONDS.labels("render").observe(0.0003)
    metrics.STAGE_SECONDS.labels("store").observe(0.0002)
    metrics.IN_FLIGHT.dec()
    metrics.MAPS.labels("done").inc()
    metrics.STAGE_SECONDS.labels("result").observe(0.0001)


def _s3_without_crc32(settings: Settings, bucket: str) -> S3Storage:
    """actmap's S3 client, but boto3 adds no CRC32 of the body (Content-MD5 still guards it)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.storage_max_attempts},
        connect_timeout=5,
        read_timeout=10,
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
    )
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
    return S3Storage(client, bucket)


def _decode(settings: Settings, payload: bytes) -> tuple[str, str, Scanlines]:
    message = decode_map(
        payload, max_pixels=settings.max_pixels, max_message_bytes=settings.max_message_bytes
    )
    rid = result_id(message.run_id, message.image_id, message.name)
    return rid, object_key("", message.image_id, message.name), message.scanlines


def _pipelined_set(backend: Any, client: Any, batch: list[tuple[str, dict[str, Any]]]) -> None:
    from celery import states

    expires = int(backend.expires) if backend.expires else None
    with client.pipeline(transaction=False) as pipe:
        for rid, result in batch:
            meta = backend._get_result_meta(result=result, state=states.SUCCESS, traceback=None, request=None)
            meta["task_id"] = rid
            pipe.set(backend.get_key_for_task(rid), backend.encode(meta), ex=expires)
        pipe.execute()


def _profile_batches(
    settings: Settings,
    local: FileStorage,
    s3: StorageLocation | None,
    s3_obstore: StorageLocation | None,
    count: int,
) -> list[list[object]]:
    rows = []
    locations = [("local", StorageLocation(local, "batch"))]
    if s3 is not None:
        locations.append(("S3", StorageLocation(s3.storage, "batch")))
    if s3_obstore is not None:
        locations.append(("S3, obstore", StorageLocation(s3_obstore.storage, "batch-obstore")))
    for name, location in locations:
        pipeline = Pipeline(settings, location, settings.upload_threads)
        payloads = packed_maps(settings, f"batch-{name}-{os.getpid()}", count, distinct=16)
        batch = settings.batch_size
        # Warm up (threads started, connections open), then time whole batches.
        list(pipeline.process_batch(payloads[:batch]))
        cpu0, wall0 = time.process_time(), time.perf_counter()
        done = 0
        for start in range(0, len(payloads), batch):
            done += sum(isinstance(o, Done) for o in pipeline.process_batch(payloads[start : start + batch]))
        wall = (time.perf_counter() - wall0) * 1e3 / len(payloads)
        cpu = (time.process_time() - cpu0) * 1e3 / len(payloads)
        assert done == len(payloads), f"{len(payloads) - done} maps failed"
        rows.append([name, wall, cpu, 1e3 / wall])
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
