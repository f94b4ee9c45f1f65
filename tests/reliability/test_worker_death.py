"""Worker death mid-run: nothing lost, nothing corrupted.

A 1,000-map run (224x224 float32 maps, 8 maps per Celery message) on Redis, PNGs in a local
folder, three workers of two pool processes. Pool processes, then whole workers, are SIGKILLed
while they hold maps; every map must still end up once as an object with exactly the bytes
``render_png`` makes and once as a success result. Duplicated executions are allowed (at-least-once
delivery) and counted from the workers' "stored at" log lines; they must be harmless.

What a worker holds is read from the broker itself: kombu's Redis transport keeps each message
delivered to a worker, until it is acknowledged, in the hash ``unacked``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from producer import CollectTimeoutError, Producer
from producer.celery_config import TASK_NAME, make_celery
from producer.keys import result_id
from producer.results import MapResult
from producer.wire import decode_map
from tests.integration.conftest import Stack
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess
from worker.render import render_png

Report = Callable[..., object]

MAPS = 1000
# Pool-process kills must land inside tasks, which last a few milliseconds: a longer run gives them
# room (1,000 maps take ~3 s on an idle machine, done before the later kill points come round).
POOL_MAPS = 4000
SHAPE = (224, 224)
BATCH_SIZE = 8
WORKERS = 3
# Redelivery of a dead worker's maps tuned for a test (defaults: 60 s and 5 s).
FAST_REDELIVERY = {
    "ACTMAP_VISIBILITY_TIMEOUT_S": "10",
    "ACTMAP_RESTORE_INTERVAL_S": "1",
    "ACTMAP_RETRY_BACKOFF_MAX_S": "3",  # the settings require visibility > backoff + longest write + 5 s
}
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> message, until acknowledged
SWEEP_LOCK_KEY = "unacked_mutex"  # kombu's Redis transport: held by the worker sweeping for them
STORED_LINE = re.compile(r"map '([^']+)' stored at ")


def cam(index: int) -> np.ndarray:
    """Map ``index`` of a run: deterministic, so it can be made again to check its PNG."""
    return np.random.default_rng(index).random(SHAPE, dtype=np.float32)


_GRID = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]] / np.array(SHAPE).reshape(2, 1, 1)


def smooth_cam(index: int) -> np.ndarray:
    """Map ``index`` as a smooth, Grad-CAM-like blob (7 KB on the wire where ``cam`` is 50 KB)."""
    y, x, width = np.random.default_rng(index).uniform(0.2, 0.8, 3)
    blob = np.exp(-((_GRID[0] - y) ** 2 + (_GRID[1] - x) ** 2) / (0.1 * width))
    return (blob / blob.max()).astype(np.float32)


def image_id(scenario: str, index: int) -> str:
    return f"{scenario}/{index:04d}"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def make_stack(redis_server: RedisServer, root: Path, **settings: str) -> Stack:
    """Redis broker and results, PNGs under ``root/maps``, 8 maps per message; no worker yet."""
    return Stack(
        env={
            "ACTMAP_HOME": str(root / "home"),
            "ACTMAP_BROKER_URL": redis_server.url(0),
            "ACTMAP_RESULT_BACKEND": redis_server.url(1),
            "ACTMAP_STORAGE_URL": f"file://{root / 'maps'}",
            "ACTMAP_BATCH_SIZE": str(BATCH_SIZE),
            "ACTMAP_LOG_EACH_MAP": "true",  # executions() counts the "stored at" lines
            **settings,
        },
        log_dir=root,
    )


def start_workers(stack: Stack, count: int = WORKERS) -> None:
    """``count`` workers of two pool processes, started side by side (start-up is mostly waiting)."""
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda _: stack.start_worker(concurrency=2), range(count)))


class ResultWatch:
    """Notes when each map's result first appears in the result backend (one MGET every 0.1 s)."""

    def __init__(self, stack: Stack, redis_server: RedisServer, result_ids: list[str]) -> None:
        app = make_celery(stack.settings, "result-watch")
        self._keys = {rid: app.backend.get_key_for_task(rid) for rid in result_ids}
        app.close()
        self._client = redis_server.client(1)
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="result-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._look()
            self._stop.wait(0.1)

    def _look(self) -> None:
        pending = [rid for rid in self._keys if rid not in self.first_seen]
        try:
            values = self._client.mget([self._keys[rid] for rid in pending]) if pending else []
        except redis.RedisError:
            values = []  # Redis restarting: look again at the next tick
        now = time.monotonic()
        for rid, value in zip(pending, values, strict=False):
            if value is not None:
                self.first_seen[rid] = now

    @property
    def count(self) -> int:
        return len(self.first_seen)

    def last_seen(self) -> float | None:
        return max(self.first_seen.values(), default=None)

    def wait_for(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count} of {count} results after {timeout_s:g} s")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._look()  # results collect saw since the last tick
        self._client.close()


def in_flight(broker: redis.Redis) -> dict[str, tuple[str, list[str]]]:
    """Messages delivered to workers, not yet acknowledged: delivery tag -> task id, its maps' result ids."""
    held: dict[str, tuple[str, list[str]]] = {}
    for tag, raw in broker.hgetall(UNACKED_KEY).items():
        message = json.loads(raw)[0]
        args = msgpack.unpackb(base64.b64decode(message["body"]), raw=False)[0]
        maps = [decode_map(m, max_pixels=1 << 24, max_message_bytes=1 << 26) for m in args[0]]
        held[tag.decode()] = (
            message["headers"]["id"],
            [result_id(m.run_id, m.image_id, m.name) for m in maps],
        )
    return held


def sweep_lock_expiry_ms(server: RedisServer, timeout_s: float = 10.0) -> int:
    """How long the running workers' sweeps for unacknowledged maps set their lock in Redis for.

    Read from the workers' own command (``SET unacked_mutex <token> NX PX <ms>``), seen by MONITOR."""
    deadline = time.monotonic() + timeout_s
    with server.client(0) as client, client.monitor() as monitor:
        while time.monotonic() < deadline:
            words = monitor.next_command()["command"].split()
            if words[:2] == ["SET", SWEEP_LOCK_KEY] and "PX" in words:
                return int(words[words.index("PX") + 1])
    raise AssertionError(f"no worker swept for unacknowledged maps within {timeout_s} s")


def queued(broker: redis.Redis) -> int:
    """Messages waiting in the queue's lists (one per priority step), not yet taken by any worker."""
    return sum(broker.llen(key) for key in broker.scan_iter("actmap*") if broker.type(key) == b"list")


def task_ids(event: str, log: str) -> set[str]:
    """Ids of the tasks a worker's log says were 'received' or 'succeeded'."""
    return set(re.findall(rf"Task {re.escape(TASK_NAME)}\[([0-9a-f-]+)\] {event}", log))


def busy(worker: WorkerProcess) -> bool:
    log = worker.log()
    return bool(task_ids("received", log) - task_ids("succeeded", log))


WORKER_LOST = "Task handler raised error: WorkerLostError"


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def working_pool_pid(
    worker: WorkerProcess, fallback: int, wait_s: float = 2.0, window_s: float = 0.02
) -> int:
    """A pool process of ``worker`` caught working on a task, so that the kill interrupts it.

    A pool process spends most of a run waiting for its next message, and a moment receiving
    it; caught in either, a kill tests nothing. Caught in the state R, it may be either too
    (on 2 busy cores, R is mostly waiting for a CPU). What tells a task is CPU time: the
    process that ran for at least half of a ``window_s`` window (its run time in
    /proc/<pid>/schedstat), far longer than receiving a message takes, is rendering.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        pids = worker.pool_pids()
        before = {pid: _cpu_ns(pid) for pid in pids}
        time.sleep(window_s)
        ran = {pid: _cpu_ns(pid) - before[pid] for pid in pids}
        busiest = max(ran, key=ran.__getitem__, default=None)
        if busiest is not None and ran[busiest] >= window_s * 1e9 / 2:
            return busiest
    # None caught working; a pool just killed may be down a process until Celery replaces it
    pids = worker.pool_pids()
    while not pids:
        time.sleep(0.05)
        pids = worker.pool_pids()
    return pids[fallback % len(pids)]


def _cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU; 0 once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class Kill:
    """One SIGKILL: when, whom, the messages it held, and which of their maps had no result yet."""

    at: float
    target: str
    held: dict[str, tuple[str, list[str]]]
    unfinished: set[str] = field(default_factory=set)

    def recovery_s(self, watch: ResultWatch) -> float | None:
        """From the kill until every map held and unfinished at the kill has its result."""
        seen = [watch.first_seen[rid] for rid in self.unfinished if rid in watch.first_seen]
        if not self.unfinished or len(seen) < len(self.unfinished):
            return None
        return max(seen) - self.at


@dataclass
class Outcome:
    objects: int  # maps whose object exists
    results: int  # success results
    failed: int  # error results (not "still pending")
    lost: int  # maps without a success result
    lost_with_object: int  # ... of which the object was stored (the result is what went missing)
    corrupted: int  # an object with other bytes, or a success result that does not describe its object
    stray_files: list[str]
    problems: list[str]


def report_outcome(
    report: Report,
    scenario: str,
    outcome: Outcome,
    *,
    maps: int,
    faults: int,
    retries: int,
    recovery_s: float | None,
    elapsed_s: float,
) -> None:
    """Add a scenario's row to the reliability table, its counts taken from ``outcome``."""
    report(
        scenario=scenario,
        maps=maps,
        faults=faults,
        retries=retries,
        objects=outcome.objects,
        results=outcome.results,
        failed=outcome.failed,
        lost=outcome.lost,
        corrupted=outcome.corrupted,
        recovery_s=recovery_s,
        elapsed_s=elapsed_s,
    )


def check_outcome(
    scenario: str, results: list[MapResult], maps_root: Path, make_map: Callable[[int], np.ndarray] = cam
) -> Outcome:
    """Each object must hold exactly render_png(map); each success result must describe its object."""
    objects = ok = failed = lost = lost_with_object = corrupted = 0
    problems: list[str] = []
    for index, result in enumerate(results):
        path = maps_root / f"{image_id(scenario, index)}.png"
        expected = render_png(make_map(index))
        stored = path.read_bytes() if path.exists() else None
        objects += stored is not None
        if stored is not None and stored != expected:
            corrupted += 1
            problems.append(f"{result.image_id}: object bytes differ from render_png(map)")
        if not result.ok:
            lost += 1
            lost_with_object += stored is not None
            failed += result.error is not None and result.error.type != "TimeoutError"
            problems.append(f"{result.image_id}: no success result ({result.error})")
            continue
        ok += 1
        described = (result.locator, result.checksum, result.bytes, result.width, result.height)
        truth = (path.as_uri(), f"md5:{hashlib.md5(expected).hexdigest()}", len(expected), SHAPE[1], SHAPE[0])
        if stored is None or described != truth:
            corrupted += 1
            problems.append(f"{result.image_id}: success result {described} but object {truth}")
    expected_files = {f"{image_id(scenario, i)}.png" for i in range(len(results))}
    # A write cut short by a kill leaves its hidden temporary file (never the map's own path).
    present = {
        p.relative_to(maps_root).as_posix()
        for p in maps_root.rglob("*")
        if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    }
    stray = sorted(present - expected_files)
    return Outcome(objects, ok, failed, lost, lost_with_object, corrupted, stray, problems)


def executions(logs: str, scenario: str) -> Counter[str]:
    """How many times each map of the scenario was stored, from the workers' 'stored at' log lines."""
    return Counter(i for i in STORED_LINE.findall(logs) if i.startswith(f"{scenario}/"))


def flush(producer: Producer) -> None:
    flush_ = getattr(producer, "flush", None)
    if flush_ is not None:
        flush_()


def run_with_kills(
    stack: Stack,
    redis_server: RedisServer,
    scenario: str,
    chaos: Callable[[ResultWatch, redis.Redis], list[Kill]],
    collect_timeout_s: float,
    maps: int = MAPS,
    make_map: Callable[[int], np.ndarray] = cam,
) -> tuple[list[MapResult], list[Kill], ResultWatch, float]:
    """Start the workers, queue the whole run (so every worker always holds maps), let ``chaos`` (in a
    thread) kill things meanwhile, and collect every map's result.

    The workers start first: one that became ready before the others could otherwise drain the
    whole backlog (1,000 maps take a few seconds) before any kill."""
    ids = [image_id(scenario, i) for i in range(maps)]
    producer = Producer(stack.settings, run_id=f"worker-death-{scenario}")
    watch = ResultWatch(stack, redis_server, [result_id(producer.run_id, i) for i in ids])
    broker = redis_server.client(0)
    kills: list[Kill] = []
    failure: list[BaseException] = []

    def run_chaos() -> None:
        try:
            kills.extend(chaos(watch, broker))
        except BaseException as exc:  # handed to the test's thread below
            failure.append(exc)

    chaos_thread = threading.Thread(target=run_chaos, name="chaos")
    try:
        start_workers(stack)
        started = time.monotonic()
        chaos_thread.start()  # kill points count results, so it waits for the maps to flow
        producer.submit_many((i, make_map(n)) for n, i in enumerate(ids))
        flush(producer)
        try:
            results = producer.collect(ids, timeout=collect_timeout_s)
        except CollectTimeoutError as exc:
            results = exc.results
        elapsed = time.monotonic() - started
    finally:
        if chaos_thread.ident is not None:
            chaos_thread.join()
        watch.close()
        broker.close()
        producer.close()
    if failure:
        raise failure[0]
    return results, kills, watch, elapsed


def test_sigkilled_pool_processes_give_their_maps_back_at_once_and_every_map_lands_once(
    private_redis: RedisServer, tmp_path: Path, report: Report
) -> None:
    # Given three workers, and a visibility timeout (600 s) far beyond the collect timeout: a map
    # can only come back through reject_on_worker_lost, never through the broker's sweep; and
    # 64 smooth maps per message, so that a pool process caught running is most likely inside a
    # task (at 8, a task took a few ms and most kills landed between two; with noise maps, 50 KB
    # each on the wire, much of its running was receiving the next message, not working on it)
    stack = make_stack(private_redis, tmp_path, ACTMAP_VISIBILITY_TIMEOUT_S="600", ACTMAP_BATCH_SIZE="64")
    kill_points = (600, 1400, 2200, 3000)

    def kill_pool_processes(watch: ResultWatch, broker: redis.Redis) -> list[Kill]:
        kills = []
        for n, point in enumerate(kill_points):
            watch.wait_for(point)
            worker = stack.workers[n % WORKERS]
            # A kill that lands between two tasks interrupts nothing: kill again, up to 5 times,
            # until the worker reports a task lost with its process.
            for _ in range(5):
                lost_before = worker.log().count(WORKER_LOST)
                # All workers' messages, the one the process is about to be caught on among them;
                # read first, as the kill must follow the catch at once (a task takes ~50 ms).
                held = in_flight(broker)
                pid = working_pool_pid(worker, fallback=n % 2)
                os.kill(pid, signal.SIGKILL)
                kill = Kill(time.monotonic(), f"{worker.name} pool pid {pid}", held)
                kill.unfinished = {rid for _, ids in held.values() for rid in ids} - set(watch.first_seen)
                kills.append(kill)
                # Celery logs the lost task within milliseconds: a short wait keeps the attempts
                # within the run (4,000 maps take ~12 s), not after its end.
                if wait_until(lambda w=worker, b=lost_before: w.log().count(WORKER_LOST) > b, timeout_s=0.5):
                    break
        return kills

    try:
        # When a pool process is SIGKILLed at four points of the run
        results, kills, watch, elapsed = run_with_kills(
            stack,
            private_redis,
            "pool",
            kill_pool_processes,
            collect_timeout_s=120,
            maps=POOL_MAPS,
            make_map=smooth_cam,
        )
    finally:
        stack.stop()
    logs = stack.worker_logs()
    outcome = check_outcome("pool", results, tmp_path / "maps", smooth_cam)
    runs = executions(logs, "pool")
    duplicates = sum(runs.values()) - len(runs)
    interrupted = logs.count(WORKER_LOST)
    recoveries = [kill.recovery_s(watch) for kill in kills]
    print(f"\npool kills: {[k.target for k in kills]}; tasks interrupted (WorkerLostError): {interrupted}")
    print(f"until every map in flight at a kill had its result (s): {recoveries}")
    print(f"duplicate executions: {duplicates}; stray files: {outcome.stray_files}")
    report_outcome(
        report,
        "SIGKILL pool processes at 4 points (3 workers x2)",
        outcome,
        maps=POOL_MAPS,
        faults=len(kills),
        retries=duplicates,
        recovery_s=max((r for r in recoveries if r is not None), default=None),
        elapsed_s=elapsed,
    )
    # Then the kills interrupted tasks (or the scenario tested nothing)
    assert interrupted >= 1
    # and every map landed once, with the bytes render_png makes, and has a success result
    assert outcome.problems == [], outcome.problems[:10]
    assert (outcome.objects, outcome.results, outcome.stray_files) == (POOL_MAPS, POOL_MAPS, [])
    assert set(runs) == {image_id("pool", i) for i in range(POOL_MAPS)}


def test_sigkilled_whole_workers_have_their_maps_redelivered_to_the_survivors_and_every_map_lands_once(
    private_redis: RedisServer, tmp_path: Path, report: Report
) -> None:
    # Given three workers, and redelivery tuned for a test: visibility 10 s, a sweep every second
    stack = make_stack(private_redis, tmp_path, **FAST_REDELIVERY)
    kill_points = (250, 550)
    lock_ms: list[int] = []

    def kill_workers(watch: ResultWatch, broker: redis.Redis) -> list[Kill]:
        kills = []
        survivors = list(stack.workers)
        for point in kill_points:
            watch.wait_for(point)
            first = not kills
            if first:
                lock_ms.append(sweep_lock_expiry_ms(private_redis))
            # A worker that holds a task, if one shows up within a second (the queue may run dry).
            deadline = time.monotonic() + 1.0
            while not any(busy(w) for w in survivors) and time.monotonic() < deadline:
                time.sleep(0.005)
            worker = next((w for w in survivors if busy(w)), survivors[0])
            survivors.remove(worker)
            worker.kill()  # main process and pool, SIGKILL; no replacement is started
            killed_at = time.monotonic()
            if first:
                # killed in the middle of its sweep: its lock stays as it set it, the others' sweeps wait
                broker.set(SWEEP_LOCK_KEY, f"{worker.name} (killed)", px=lock_ms[0])
            # What it held: unacknowledged, received by it and never finished by it.
            log = worker.log()
            held_tasks = task_ids("received", log) - task_ids("succeeded", log)
            held = {tag: msg for tag, msg in in_flight(broker).items() if msg[0] in held_tasks}
            kill = Kill(killed_at, worker.name, held)
            kill.unfinished = {rid for _, ids in held.values() for rid in ids} - set(watch.first_seen)
            kills.append(kill)
        return kills

    try:
        # When one worker, then a second one, is SIGKILLed (main process and pool) during the run, the
        # first one while it holds the lock of the sweep for unacknowledged maps (kombu's default expiry,
        # five minutes, would hold back the redelivery of its maps that long)
        results, kills, watch, elapsed = run_with_kills(
            stack, private_redis, "worker", kill_workers, collect_timeout_s=45
        )
    finally:
        stack.stop()
    outcome = check_outcome("worker", results, tmp_path / "maps")
    runs = executions(stack.worker_logs(), "worker")
    duplicates = sum(runs.values()) - len(runs)
    recoveries = [kill.recovery_s(watch) for kill in kills]
    for kill, recovery in zip(kills, recoveries, strict=True):
        print(
            f"\n{kill.target} killed holding {len(kill.held)} message(s), {len(kill.unfinished)} map(s) "
            f"without a result; all had their result {recovery} s after the kill"
        )
    print(f"the first killed holding the sweep's lock, which expires after {lock_ms[0]} ms")
    print(f"duplicate executions: {duplicates}; stray files: {outcome.stray_files}")
    print(f"maps without a success result: {[p.split(':')[0] for p in outcome.problems]}")
    report_outcome(
        report,
        "SIGKILL whole worker x2 (of 3, no replacement; the first holding the redelivery sweep's lock)",
        outcome,
        maps=MAPS,
        faults=len(kills),
        retries=duplicates,
        recovery_s=max((r for r in recoveries if r is not None), default=None),
        elapsed_s=elapsed,
    )
    # Then a killed worker took unfinished maps down with it (or the scenario tested nothing)
    assert any(kill.unfinished for kill in kills)
    # and every map landed once, with the bytes render_png makes, and has a success result
    assert outcome.problems == [], outcome.problems[:10]
    assert (outcome.objects, outcome.results, outcome.stray_files) == (MAPS, MAPS, [])
    assert set(runs) == {image_id("worker", i) for i in range(MAPS)}


def test_a_worker_killed_after_taking_a_message_before_recording_it_unacknowledged_loses_no_maps(
    private_redis: RedisServer, tmp_path: Path, report: Report
) -> None:
    """The window a whole-worker kill can hit: kombu's Redis transport takes a message with BRPOP
    (the message leaves the queue) and only then, once the worker's event loop reads the reply,
    records it in ``unacked``. Freezing the worker (SIGSTOP) while its BRPOP waits opens that window
    on purpose: a map published then is popped for the frozen worker and is nowhere in Redis."""
    stack = make_stack(private_redis, tmp_path, **FAST_REDELIVERY)
    victim = stack.start_worker(concurrency=2)
    broker = private_redis.client(0)
    producer = stack.producer(run_id="worker-death-window")
    ids: list[str] = []
    try:
        producer.collect(producer.submit_many([("window/warm-up", cam(0))]), timeout=60)
        for attempt in range(5):
            # Given the only worker idle (its BRPOP waits, up to 1 s), frozen
            time.sleep(0.2)
            os.kill(victim.process.pid, signal.SIGSTOP)
            # When a batch of maps is published
            batch = [(f"window/{attempt}-{i}", cam(i)) for i in range(BATCH_SIZE)]
            producer.submit_many(batch)
            flush(producer)
            time.sleep(0.2)
            if queued(broker) == 0 and broker.hlen(UNACKED_KEY) == 0:
                ids = [i for i, _ in batch]
                break  # popped for the frozen worker: in neither the queue nor unacked
            # (its BRPOP had timed out: the message waits in the queue; let it be done, try again)
            os.kill(victim.process.pid, signal.SIGCONT)
            producer.collect([i for i, _ in batch], timeout=60)
        assert ids, "could not catch the worker between BRPOP and recording the message"
        # and the worker dies there; another one starts
        victim.kill()
        stack.start_worker(concurrency=2)
        started = time.monotonic()
        try:
            results = producer.collect(ids, timeout=25)  # visibility timeout 10 s, sweep every 1 s
        except CollectTimeoutError as exc:
            results = exc.results
        elapsed = time.monotonic() - started
    finally:
        victim.kill()
        stack.stop()
        producer.close()
        broker.close()
    ok = sum(r.ok for r in results)
    report(
        scenario="SIGKILL worker between BRPOP and unacked",
        maps=len(ids),
        faults=1,
        objects=sum((tmp_path / "maps" / f"{i}.png").exists() for i in ids),
        results=ok,
        failed=sum(not r.ok and r.error is not None and r.error.type != "TimeoutError" for r in results),
        lost=len(ids) - ok,
        elapsed_s=elapsed,
    )
    # Then its maps are redelivered anyway, like those of any dead worker
    assert [r.error for r in results if not r.ok] == []
