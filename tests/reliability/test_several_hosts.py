"""Workers on separate network hosts, one of them cut off mid-run: nothing lost, nothing corrupted.

Three network namespaces made by the test stand for three machines. Each is joined to the root namespace
by its own veth pair (``10.231.k.2`` inside, ``10.231.k.1`` outside), and runs one ``actmap worker`` of
two pool processes. One Redis (broker and results, with a password: it listens beyond loopback) runs in
the root namespace, bound to 127.0.0.1 and to the outer end of each pair; each host's worker reaches it
at its own link's address and at nothing else. PNGs go to a local folder on the filesystem all of them
share (namespaces only separate the network).

Cutting a host off (its link taken down from the root namespace) leaves its worker running but unable to
reach Redis: the messages it holds stay unacknowledged until the visibility timeout hands them to the
other hosts. Requires root and iproute2; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from producer import CollectTimeoutError, Producer
from producer.keys import result_id
from tests.reliability.test_worker_death import (
    FAST_REDELIVERY,
    STORED_LINE,
    Kill,
    Report,
    ResultWatch,
    busy,
    cam,
    check_outcome,
    executions,
    flush,
    image_id,
    in_flight,
    make_stack,
    report_outcome,
    task_ids,
)
from tests.support.netns import Host, Hosts, unavailable_reason
from tests.support.ports import LOOPBACK
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess

HOSTS = 3
MAPS = 600
CUT_AT = 250  # results recorded when a host is cut off
SCENARIO = "hosts"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot make network namespaces for separate hosts: {reason}")
    with Hosts(HOSTS) as made:
        yield made


def stored_by(worker: WorkerProcess) -> Counter[str]:
    """Maps of the scenario this worker's log says it stored (with repeats)."""
    return Counter(i for i in STORED_LINE.findall(worker.log()) if i.startswith(f"{SCENARIO}/"))


def test_workers_on_three_hosts_share_the_work_and_a_host_cut_off_mid_run_loses_no_maps(
    hosts: Hosts, tmp_path: Path, report: Report
) -> None:
    # Given one Redis in the root namespace, reachable from each host at its own link's address only
    with RedisServer(bind=(LOOPBACK, *hosts.gateways), password=secrets.token_urlsafe(16)) as server:
        stack = make_stack(server, tmp_path, **FAST_REDELIVERY)
        placed: dict[str, Host] = {}  # worker name -> its host

        def start_on(host: Host) -> WorkerProcess:
            env = {
                **stack.env,
                "ACTMAP_BROKER_URL": server.url(0, host=host.gateway),
                "ACTMAP_RESULT_BACKEND": server.url(1, host=host.gateway),
            }
            worker = WorkerProcess(env, tmp_path, concurrency=2, prefix=host.prefix)
            placed[worker.name] = host
            return worker

        ids = [image_id(SCENARIO, i) for i in range(MAPS)]
        producer = Producer(stack.settings, run_id="several-hosts")
        watch = ResultWatch(stack, server, [result_id(producer.run_id, i) for i in ids])
        broker = server.client(0)
        cuts: list[tuple[Kill, WorkerProcess, dict[str, int], int]] = []
        failure: list[BaseException] = []

        def cut_one_off() -> None:
            try:
                watch.wait_for(CUT_AT, timeout_s=60)
                # and once every host has stored maps (one whose worker was slow to start may not have)
                deadline = time.monotonic() + 20.0
                while not all(stored_by(w) for w in stack.workers) and time.monotonic() < deadline:
                    time.sleep(0.05)
                # A worker that holds a task, if one shows up within a second (the queue may run dry).
                deadline = time.monotonic() + 1.0
                while not any(busy(w) for w in stack.workers) and time.monotonic() < deadline:
                    time.sleep(0.005)
                worker = next((w for w in stack.workers if busy(w)), stack.workers[0])
                before = {w.name: len(set(stored_by(w))) for w in stack.workers}
                placed[worker.name].cut_off()
                cut_at = time.monotonic()
                log = worker.log()
                held_tasks = task_ids("received", log) - task_ids("succeeded", log)
                everyone = in_flight(broker)
                held = {tag: msg for tag, msg in everyone.items() if msg[0] in held_tasks}
                cut = Kill(cut_at, f"{worker.name} on {placed[worker.name].netns}", held)
                # Recovery is timed over every map in flight anywhere at the cut (the survivors' finish
                # at once): the cut-off worker may hold a message its log does not show received yet.
                in_flight_ids = {rid for _, rids in everyone.values() for rid in rids}
                cut.unfinished = in_flight_ids - set(watch.first_seen)
                cuts.append((cut, worker, before, len(everyone)))
            except BaseException as exc:  # handed to the test's thread below
                failure.append(exc)

        chaos = threading.Thread(target=cut_one_off, name="cut-off")
        try:
            producer.submit_many((i, cam(n)) for n, i in enumerate(ids))
            flush(producer)
            started = time.monotonic()
            # When a worker starts on each host, on that backlog, and one host is cut off mid-run
            with ThreadPoolExecutor(HOSTS) as pool:
                stack.workers.extend(pool.map(start_on, hosts.hosts))
            chaos.start()
            try:
                results = producer.collect(ids, timeout=60)
            except CollectTimeoutError as exc:
                results = exc.results
            elapsed = time.monotonic() - started
        finally:
            if chaos.ident is not None:
                chaos.join()
            cut_alive = [w.alive() for _, w, _, _ in cuts]
            for _, worker, _, _ in cuts:
                worker.kill()  # cannot reach Redis: a warm shutdown would only hang
            stack.stop()
            watch.close()
            with contextlib.suppress(redis.RedisError):
                broker.close()
            producer.close()
        if failure:
            raise failure[0]

    ((cut, cut_worker, stored_before, messages_in_flight),) = cuts
    outcome = check_outcome(SCENARIO, results, tmp_path / "maps")
    runs = executions(stack.worker_logs(), SCENARIO)
    duplicates = sum(runs.values()) - len(runs)
    recovery = cut.recovery_s(watch)
    per_host = {f"{w.name}@{placed[w.name].netns}": len(set(stored_by(w))) for w in stack.workers}
    print(f"\nhosts: {[(h.netns, h.address, h.gateway) for h in hosts.hosts]}")
    print(f"maps stored before the cut, per worker: {stored_before}; in all, per host: {per_host}")
    print(
        f"{cut.target} cut off holding {len(cut.held)} message(s) by its log ({messages_in_flight} in flight "
        f"on all hosts, {len(cut.unfinished)} map(s) in them without a result); all had their result "
        f"{recovery} s after the cut; still running at the end: {cut_alive}"
    )
    stored_after = len(set(stored_by(cut_worker))) - stored_before[cut_worker.name]
    print(f"maps the cut-off worker stored after the cut (stored again by others): {stored_after}")
    print(f"duplicate executions: {duplicates}; stray files: {outcome.stray_files}; elapsed {elapsed:.1f} s")
    report_outcome(
        report,
        "host cut off (netns)",
        outcome,
        maps=MAPS,
        faults=1,
        retries=duplicates,
        recovery_s=recovery,
        elapsed_s=elapsed,
    )
    # Then every host did part of the work before the cut
    assert all(count > 0 for count in stored_before.values()), stored_before
    # and the host cut off held unfinished maps (or the scenario tested nothing)
    assert cut.unfinished
    # and every map landed once, with the bytes render_png makes, and has a success result
    assert outcome.problems == [], outcome.problems[:10]
    assert (outcome.objects, outcome.results, outcome.stray_files) == (MAPS, MAPS, [])
    assert set(runs) == set(ids)
