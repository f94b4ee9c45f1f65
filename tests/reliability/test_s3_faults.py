"""S3 misbehaving under the workers: nothing lost, nothing corrupted, failures bounded and named.

The workers' boto3 talks to SeaweedFS through ``FaultProxy`` (tests/support/fault_proxy.py), which
answers 503 SlowDown or 500 InternalError, resets connections before or after the server saw the
request, stalls requests past boto3's read timeout (5 s), or flips a bit of a PUT body (SeaweedFS
checks Content-MD5 and must refuse it). Every check reads the bucket directly from SeaweedFS,
never through the proxy, and compares each object with ``render_png`` of its map byte for byte.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pytest

from producer import CollectTimeoutError, MapResult
from producer.keys import object_key, result_id
from tests.integration.conftest import Stack
from tests.reliability.test_worker_death import Report
from tests.support.fault_proxy import FaultProxy, ProxyStats
from tests.support.ports import poll_until
from tests.support.redis_server import RedisServer
from tests.support.seaweedfs import SeaweedS3
from worker.render import render_png

PREFIX = "maps"
# A worker loses boto3's read timeout (5 s) per stall, so only a few of them.
STALL_S = 8.0
# The workers' S3 clients (ACTMAP_S3_CLIENT): boto3, the default, and obstore.
S3_CLIENTS = ["boto3", "obstore"]
SCENARIO_SUFFIX = {"boto3": "", "obstore": " (obstore)"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@dataclass
class FaultStack:
    stack: Stack
    proxy: FaultProxy
    bucket: str


@contextmanager
def fault_stack(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path, db: int, proxy: FaultProxy, **settings: str
) -> Iterator[FaultStack]:
    """One worker (two processes) whose S3 endpoint is the proxy, on its own bucket and Redis dbs."""
    bucket = s3_server.create_bucket()
    s3_env = {k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL_S3"}  # only the proxy
    env = {
        "ACTMAP_HOME": str(tmp_path / "home"),
        "ACTMAP_BROKER_URL": redis.url(db),
        "ACTMAP_RESULT_BACKEND": redis.url(db + 1),
        "ACTMAP_STORAGE_URL": f"s3://{bucket}/{PREFIX}",
        "ACTMAP_S3_ENDPOINT_URL": proxy.url,
        **s3_env,
        **{f"ACTMAP_{name.upper()}": value for name, value in settings.items()},
    }
    stack = Stack(env=env, log_dir=tmp_path)
    try:
        stack.start_worker()
        yield FaultStack(stack, proxy, bucket)
    finally:
        stack.stop()
        proxy.stop()  # cancels stalled requests before the bucket goes
        s3_server.delete_bucket(bucket)


def start_proxy(s3_server: SeaweedS3, **options: object) -> FaultProxy:
    endpoint = urlsplit(s3_server.endpoint_url)
    assert endpoint.hostname is not None and endpoint.port is not None
    return FaultProxy(endpoint.hostname, endpoint.port, **options).start()  # type: ignore[arg-type]


def smooth_map(rng: np.random.Generator) -> np.ndarray:
    height, width = (int(n) for n in rng.integers(16, 65, 2))
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    cy, cx = rng.uniform(0.2, 0.8, 2)
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.02, 0.1))
    return (cam / cam.max()).astype(np.float32)


def stored_objects(s3_server: SeaweedS3, bucket: str) -> dict[str, tuple[bytes, str]]:
    """Every object of the bucket, read directly from SeaweedFS: key -> (bytes, ETag)."""
    client = s3_server.client()
    try:
        objects = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for entry in page.get("Contents", []):
                response = client.get_object(Bucket=bucket, Key=entry["Key"])
                objects[entry["Key"]] = (response["Body"].read(), response["ETag"].strip('"'))
        return objects
    finally:
        client.close()


def collect_all(stack: Stack, run_id: str, image_ids: list[str], timeout: float) -> list[MapResult]:
    with stack.producer(run_id=run_id) as producer:
        try:
            return producer.collect(image_ids, timeout=timeout)
        except CollectTimeoutError as exc:
            return exc.results  # the pending ones carry a TimeoutError: counted as lost


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass
class Audit:
    """Results and bucket compared with what each map must give."""

    ok: int = 0
    failed: int = 0
    lost: int = 0  # no result at all, or a success whose object is missing
    corrupted: int = 0  # an object with other bytes, or a success whose checksum/ETag does not match
    stray: int = 0  # objects under no expected key
    why: list[str] = field(default_factory=list)  # what was wrong with each corrupted one

    def __str__(self) -> str:
        counts = f"ok={self.ok} failed={self.failed} lost={self.lost} corrupted={self.corrupted}"
        return "; ".join([f"{counts} stray={self.stray}", *self.why[:8]])


def report_audit(report: Report, scenario: str, figures: Audit, *, objects: int, **row: Any) -> None:
    """Add a scenario's row to the reliability table, its result counts taken from ``figures``."""
    report(
        scenario=scenario,
        objects=objects,
        results=figures.ok + figures.failed,
        failed=figures.failed,
        lost=figures.lost,
        corrupted=figures.corrupted,
        **row,
    )


class FaultRun(NamedTuple):
    expected: dict[str, bytes]  # image id -> the PNG render_png makes
    results: list[MapResult]
    elapsed_s: float
    stats: ProxyStats  # taken as the last result arrived
    objects: dict[str, tuple[bytes, str]]
    figures: Audit

    def report_to(self, report: Report, scenario: str, **row: Any) -> None:
        """This run's row in the reliability table: its audit, the faults, the PUTs retried, its time."""
        maps = len(self.expected)
        report_audit(
            report,
            scenario,
            self.figures,
            objects=len(self.objects),
            maps=maps,
            faults=self.stats.faults_total,
            retries=self.stats.by_method["PUT"] - maps,
            elapsed_s=self.elapsed_s,
            **row,
        )


def submit_and_audit(
    fs: FaultStack, s3_server: SeaweedS3, maps: dict[str, np.ndarray], timeout: float
) -> FaultRun:
    """Submit ``maps`` in one run, collect them, and audit the bucket against render_png."""
    expected = {image_id: render_png(cam) for image_id, cam in maps.items()}
    started = time.monotonic()
    with fs.stack.producer() as producer:
        producer.submit_many(maps.items())
        run_id = producer.run_id
    results = collect_all(fs.stack, run_id, list(maps), timeout=timeout)
    elapsed = time.monotonic() - started
    stats = fs.proxy.stats()
    objects = stored_objects(s3_server, fs.bucket)
    return FaultRun(expected, results, elapsed, stats, objects, audit(results, expected, objects, fs.bucket))


def audit(
    results: list[MapResult], expected: dict[str, bytes], objects: dict[str, tuple[bytes, str]], bucket: str
) -> Audit:
    """``expected`` maps image id -> PNG bytes; results are in the same order."""
    figures = Audit()
    for (image_id, png), result in zip(expected.items(), results, strict=True):
        key = object_key(PREFIX, image_id)
        if result.error is not None:
            lost = result.error.type == "TimeoutError"
            figures.lost += lost
            figures.failed += not lost
        elif key not in objects:
            figures.lost += 1
        else:
            figures.ok += 1
            body, etag = objects[key]
            right = (
                result.locator == f"s3://{bucket}/{key}"
                and result.bytes == len(png)
                and result.checksum == f"md5:{md5(png)}"
                and etag == md5(body)
            )
            figures.corrupted += not right
            if not right:
                figures.why.append(
                    f"{image_id}: result {result.locator} {result.bytes} B {result.checksum}, "
                    f"PNG {len(png)} B md5:{md5(png)}, object {len(body)} B md5:{md5(body)} ETag {etag}"
                )
    keys = {object_key(PREFIX, image_id): png for image_id, png in expected.items()}
    for key, (body, _) in objects.items():
        if key in keys and body != keys[key]:
            figures.corrupted += 1
            differ = sum(a != b for a, b in zip(body, keys[key], strict=False))
            figures.why.append(
                f"{key}: {len(body)} B stored, {len(keys[key])} B expected, {differ} bytes differ"
            )
    figures.stray = sum(key not in keys for key in objects)
    return figures


def log_count(stack: Stack, pattern: str) -> int:
    return len(re.findall(pattern, stack.worker_logs()))


@pytest.mark.parametrize("client", S3_CLIENTS)
def test_with_30_percent_of_s3_requests_faulted_every_map_is_stored_once_byte_for_byte_and_none_is_lost(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report, client: str
) -> None:
    # Given workers whose S3 requests fail 30% of the time, in every way the proxy knows (few stalls)
    proxy = start_proxy(s3_server, seed=30, fault_rate=0.3, stall_s=STALL_S, max_stalls=3)
    # 30% faults: a PUT round (3 boto3 attempts) fails with p = 0.3**3 = 2.7%; 20 Celery retries
    # make giving up impossible in practice (p = 0.3**21 per map even once boto3's retry quota is spent
    # and each round is a single attempt).
    with fault_stack(
        redis, s3_server, tmp_path, 0, proxy, task_max_retries="20", retry_backoff_max_s="1", s3_client=client
    ) as fs:
        rng = np.random.default_rng(500)
        maps = {f"fault/{i:03d}": smooth_map(rng) for i in range(500)}
        # When 500 maps are submitted and collected
        run = submit_and_audit(fs, s3_server, maps, timeout=200)
        _, results, elapsed, stats, objects, figures = run
        map_retries = log_count(fs.stack, r"will be retried")
        task_retries = log_count(fs.stack, r"retrying \d+ map\(s\)")
    run.report_to(report, f"S3 30% faults{SCENARIO_SUFFIX[client]}")
    print(
        f"\n30% faults: {stats.by_method['PUT']} PUTs for {len(maps)} maps, faults {dict(stats.faults)}, "
        f"{map_retries} map retries by Celery in {task_retries} retry messages, "
        f"server's answers to bit flips {dict(stats.bitflip_answers)}, {elapsed:.1f} s"
    )
    # Then every map has exactly one object, with the right bytes, and one success result
    assert figures.lost == 0 and figures.corrupted == 0, str(figures)
    assert figures.ok == len(maps), [r.error for r in results if not r.ok][:3]
    assert sorted(objects) == sorted(object_key(PREFIX, image_id) for image_id in maps)
    # and the faults did happen, of every kind, and took retries of both layers to overcome
    assert set(stats.faults) == {"slowdown", "internal", "reset_before", "reset_after", "stall", "bitflip"}
    assert 0.22 < stats.faults_total / stats.requests < 0.38
    assert stats.bitflip_answers == {"400 BadDigest": stats.faults["bitflip"]}
    assert map_retries > 0 and task_retries > 0
    assert stats.upstream_errors == 0


CAUSES = ("SlowDown", "InternalError", "ConnectionClosedError", "BadDigest")


def test_with_every_s3_request_faulted_each_map_fails_naming_the_cause_and_the_worker_then_recovers(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report
) -> None:
    # Given workers whose every S3 request fails (no stalls: their bound is the read timeout)
    kinds = ("slowdown", "internal", "reset_before", "reset_after", "bitflip")
    proxy = start_proxy(s3_server, seed=100, fault_rate=1.0, kinds=kinds)
    max_retries, attempts = 2, 3
    with fault_stack(
        redis,
        s3_server,
        tmp_path,
        2,
        proxy,
        task_max_retries=str(max_retries),
        retry_backoff_max_s="1",
        storage_max_attempts=str(attempts),
        batch_size="4",
    ) as fs:
        rng = np.random.default_rng(100)
        maps = {f"down/{i:02d}": smooth_map(rng) for i in range(12)}
        # When maps are submitted, then each ends failed, within the collect timeout
        run = submit_and_audit(fs, s3_server, maps, timeout=150)
        _, results, elapsed, stats, objects, figures = run
        rounds = log_count(fs.stack, r"will be retried")
        # And when S3 is healthy again, the same worker stores a new map
        proxy.fault_rate = 0.0
        healed = time.monotonic()
        cam = smooth_map(rng)
        with fs.stack.producer() as producer:
            producer.submit("down/after", cam)
            after = collect_all(fs.stack, producer.run_id, ["down/after"], timeout=60)[0]
        recovery = time.monotonic() - healed
        after_objects = stored_objects(s3_server, fs.bucket)
    run.report_to(report, "S3 100% faults", recovery_s=recovery)
    print(
        f"\n100% faults: {len(maps)} maps failed in {elapsed:.1f} s after {stats.by_method['PUT']} PUTs "
        f"({dict(stats.faults)}); {len(objects)} objects stored by requests whose answer was reset "
        f"(right bytes, failed results); recovery {recovery:.1f} s; first error: {results[0].error}"
    )
    assert figures.lost == 0 and figures.corrupted == 0 and figures.stray == 0, str(figures)
    assert figures.failed == len(maps)
    for result in results:
        assert result.error is not None and result.error.type == "StorageError"
        assert f"gave up after {max_retries} retries" in result.error.message
        assert any(cause in result.error.message for cause in CAUSES), result.error.message
    # Every map was tried exactly 1 + max_retries times by Celery, each time at most `attempts` PUTs
    assert rounds == len(maps) * (1 + max_retries)
    assert len(maps) * (1 + max_retries) <= stats.by_method["PUT"] <= len(maps) * (1 + max_retries) * attempts
    assert stats.upstream_errors == 0
    assert after.ok, after.error
    key = object_key(PREFIX, "down/after")
    assert after_objects[key][0] == render_png(cam)
    assert after.checksum == f"md5:{after_objects[key][1]}"


@pytest.mark.parametrize("client", S3_CLIENTS)
def test_a_bit_flipped_upload_is_refused_with_bad_digest_and_never_stored_and_a_clean_one_matches_its_etag(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report, client: str
) -> None:
    # Given workers whose every PUT body gets one bit flipped on the way (boto3 sends Content-MD5,
    # obstore x-amz-checksum-sha256: the server checks either; it does not check the SHA-256 of a
    # signed payload, so without a checksum header a flipped body would be stored)
    proxy = start_proxy(s3_server, seed=7, fault_rate=1.0, kinds=["bitflip"])
    max_retries = 2
    with fault_stack(
        redis,
        s3_server,
        tmp_path,
        4,
        proxy,
        task_max_retries=str(max_retries),
        retry_backoff_max_s="1",
        s3_client=client,
    ) as fs:
        rng = np.random.default_rng(7)
        maps = {f"flip/{i}": smooth_map(rng) for i in range(4)}
        # When maps are submitted
        run = submit_and_audit(fs, s3_server, maps, timeout=60)
        expected, results, _, flipped, objects, figures = run
        # And then submitted again (a new run) once the corruption stops
        proxy.fault_rate = 0.0
        healed = time.monotonic()
        with fs.stack.producer() as producer:
            producer.submit_many(maps.items())
            clean_run = producer.run_id
        clean = collect_all(fs.stack, clean_run, list(maps), timeout=60)
        recovery = time.monotonic() - healed
        clean_objects = stored_objects(s3_server, fs.bucket)
        clean_figures = audit(clean, expected, clean_objects, fs.bucket)
    run.report_to(report, f"S3 bit flips 100%{SCENARIO_SUFFIX[client]}")
    report_audit(
        report,
        f"S3 bit flips, then 0%{SCENARIO_SUFFIX[client]}",
        clean_figures,
        objects=len(clean_objects),
        maps=len(maps),
        recovery_s=recovery,
    )
    # Then the server refused every corrupted body, nothing was stored, and each map failed naming it
    assert flipped.by_method["PUT"] == flipped.faults["bitflip"] >= len(maps) * (1 + max_retries)
    assert flipped.bitflip_answers == {"400 BadDigest": flipped.faults["bitflip"]}
    assert objects == {}
    assert figures.failed == len(maps) and figures.lost == 0
    for result in results:
        assert result.error is not None and "BadDigest" in result.error.message, result.error
    # And the clean uploads are right: checksum == ETag == MD5 of the stored bytes == MD5 of the PNG
    assert clean_figures.ok == len(maps) and clean_figures.corrupted == 0 and clean_figures.stray == 0, str(
        clean_figures
    )
    for image_id, result in zip(maps, clean, strict=True):
        body, etag = clean_objects[object_key(PREFIX, image_id)]
        assert body == expected[image_id]
        assert result.checksum == f"md5:{etag}" == f"md5:{md5(body)}"


def test_a_batch_slowed_by_s3_throttling_is_processed_once_not_again_by_a_second_worker(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path, report
) -> None:
    # Given S3 answering SlowDown to everything, a short visibility timeout (20 s) and 40 maps in
    # one message: each PUT backs off, so the message's maps take longer than the broker waits
    proxy = start_proxy(s3_server, seed=11, fault_rate=1.0, kinds=["slowdown"])
    attempts = 2
    with fault_stack(
        redis,
        s3_server,
        tmp_path,
        6,
        proxy,
        task_max_retries="0",
        retry_backoff_max_s="1",
        storage_max_attempts=str(attempts),
        s3_connect_timeout_s="1",
        s3_read_timeout_s="2",
        visibility_timeout_s="20",
        restore_interval_s="1",
        batch_size="40",
        upload_threads="1",
    ) as fs:
        rng = np.random.default_rng(11)
        maps = {f"slow/{i}": smooth_map(rng) for i in range(40)}
        run = submit_and_audit(fs, s3_server, maps, timeout=120)
        _, _, elapsed, stats, _, figures = run
        for worker in fs.stack.workers:
            worker.kill()  # a duplicate may still be backing off; a warm shutdown would wait for it
    run.report_to(report, "S3 SlowDown, batch > visibility")
    print(
        f"\nbatch slower than the visibility timeout: {stats.by_method['PUT']} PUTs for {len(maps)} maps "
        f"(at most {len(maps) * attempts} expected: task_max_retries=0), {elapsed:.1f} s"
    )
    assert figures.failed == len(maps) and figures.lost == 0 and figures.corrupted == 0, str(figures)
    # Then each map was tried once (no Celery retries allowed): at most `attempts` PUTs each
    assert stats.by_method["PUT"] <= len(maps) * attempts


def test_a_result_is_not_held_back_by_a_slow_put_of_the_same_message(
    redis: RedisServer, s3_server: SeaweedS3, tmp_path: Path
) -> None:
    # Given a worker whose first S3 PUT hangs for two minutes (its read timeout is longer)
    proxy = start_proxy(s3_server, fault_rate=1.0, kinds=["stall"], stall_s=120, max_stalls=1)
    with (
        fault_stack(
            redis,
            s3_server,
            tmp_path,
            8,
            proxy,
            s3_read_timeout_s="150",
            storage_max_attempts="1",
            visibility_timeout_s="1000",
        ) as faults,
        faults.stack.producer(run_id="slow-put") as producer,
    ):
        # When two maps come in one message: one PUT hangs, the other is done at once
        rng = np.random.default_rng(8)
        producer.submit_many([("a", smooth_map(rng)), ("b", smooth_map(rng))])
        producer.flush(30)
        backend = producer._app.backend
        keys = {i: backend.get_key_for_task(result_id("slow-put", i)) for i in ("a", "b")}
        # Then the result of the one done is in Redis while the other PUT still hangs
        poll_until(lambda: backend.client.exists(*keys.values()) > 0, 60, "the first result")
        assert backend.client.exists(*keys.values()) == 1
        assert proxy.stats().faults["stall"] == 1
        faults.stack.workers[0].kill()  # not a warm stop: it would wait for the hanging PUT
