"""collect reads a window of the oldest pending results per MGET, not every pending one per poll.

Results are written the way the workers write them (worker.result_store.ResultStore) into a
private Redis, or into the filesystem backend; what Redis received is counted with MONITOR
and INFO, so a test cannot be fooled by what the client thinks it sent.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis

from producer import Producer, Settings
from producer.celery_config import make_celery
from producer.errors import BrokerError, CollectTimeoutError, InvalidMapError
from producer.keys import result_id
from producer.result_poller import WINDOW
from producer.results import MapResult, success_result
from tests.support.redis_server import RedisServer
from worker.result_store import ResultStore

RESULTS_DB = 1
MAPS = 5000


def redis_settings(server: RedisServer, home: Path, **overrides: object) -> Settings:
    return Settings(
        home=home,
        broker_url=server.url(0),
        result_backend=server.url(RESULTS_DB),
        **overrides,  # type: ignore[arg-type]
    )


def image_ids(count: int) -> list[str]:
    return [f"img/{i:05d}" for i in range(count)]


def write_results(settings: Settings, run_id: str, ids: Sequence[str], *, failed: Sequence[str] = ()) -> None:
    """Record success results (and failures for ``failed``) as a worker does."""
    app = make_celery(settings, "test-worker")
    store = ResultStore(app.backend, flush_every=500, max_delay_s=60)
    for image_id in ids:
        rid = result_id(run_id, image_id)
        if image_id in failed:
            store.failed(rid, InvalidMapError(f"{image_id} is broken"))
        else:
            store.succeeded(rid, expected(image_id))
    store.flush()
    app.close()


def expected(image_id: str) -> dict[str, object]:
    return success_result(
        image_id=image_id, name=None, locator=f"file:///maps/{image_id}.png", width=4, height=3, size=99,
        checksum=f"sum-{image_id}",
    )  # fmt: skip


def assert_ok_in_order(results: Sequence[MapResult], ids: Sequence[str]) -> None:
    assert [r.image_id for r in results] == list(ids)
    bad = [r for r in results if not r.ok or r.locator != f"file:///maps/{r.image_id}.png"]
    assert bad == []
    assert all(r.checksum == f"sum-{r.image_id}" for r in results)


class MgetSizes:
    """The number of keys of each MGET on one db, as Redis MONITOR shows it received them."""

    STOP = "actmap-test-monitor-stop"

    def __init__(self, server: RedisServer, db: int) -> None:
        self._server = server
        self._db = db
        self._client = redis.Redis.from_url(server.url(db))  # no socket timeout: it waits for commands
        self._monitor = self._client.monitor().__enter__()  # MONITOR is on once this returns
        self.sizes: list[int] = []
        self.first_seen = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        for command in self._monitor.listen():
            words = command["command"].split()  # result keys hold no spaces
            if words == ["ECHO", self.STOP]:
                return
            if words[0].upper() == "MGET" and command["db"] == self._db:
                self.sizes.append(len(words) - 1)
                self.first_seen.set()

    def stop(self) -> None:
        """Wait until every command sent before this call is counted, then stop."""
        client = self._server.client(self._db)
        client.echo(self.STOP)
        client.close()
        self._thread.join(60)
        assert not self._thread.is_alive()
        self._monitor.__exit__()
        self._client.close()


@contextmanager
def mget_sizes(server: RedisServer, db: int = RESULTS_DB) -> Iterator[MgetSizes]:
    watch = MgetSizes(server, db)
    try:
        yield watch
    finally:
        watch.stop()


def keys_read(server: RedisServer) -> int:
    client = server.client(RESULTS_DB)
    stats = client.info("stats")
    client.close()
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


def mget_calls(server: RedisServer) -> int:
    client = server.client(RESULTS_DB)
    stats = client.info("commandstats")
    client.close()
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


def write_later(
    settings: Settings, run_id: str, chunks: list[list[str]], start: threading.Event
) -> threading.Thread:
    """A thread that, once ``start`` is set, writes the results a chunk at a time."""

    def run() -> None:
        assert start.wait(60)
        for chunk in chunks:
            write_results(settings, run_id, chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_ready_results_are_read_a_window_per_mget_in_submission_order(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    settings = redis_settings(module_redis, tmp_path)
    run_id = uuid.uuid4().hex
    ids = image_ids(MAPS)
    failed = ids[7::1000]
    write_results(settings, run_id, ids, failed=failed)
    mgets_before, keys_before = mget_calls(module_redis), keys_read(module_redis)
    # When a run's 5,000 results, all ready, are collected
    with Producer(settings, run_id=run_id) as producer, mget_sizes(module_redis) as watch:
        results = producer.collect(ids, timeout=60)
    # Then each MGET asked for one window of keys, and no key was read twice
    assert watch.sizes == [WINDOW] * (MAPS // WINDOW) + [MAPS % WINDOW]
    assert mget_calls(module_redis) - mgets_before == math.ceil(MAPS / WINDOW)
    assert keys_read(module_redis) - keys_before == MAPS
    # and every result came back, failures as failures, in the order asked
    assert [r.image_id for r in results] == ids
    assert [r.image_id for r in results if not r.ok] == failed
    assert {r.error.type for r in results if r.error is not None} == {"InvalidMapError"}
    assert_ok_in_order([r for r in results if r.ok], [i for i in ids if i not in failed])


def test_while_most_maps_are_pending_no_mget_reads_more_than_a_window(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    settings = redis_settings(module_redis, tmp_path)
    run_id = uuid.uuid4().hex
    ids = image_ids(MAPS)
    with Producer(settings, run_id=run_id) as producer, mget_sizes(module_redis) as watch:
        # When results arrive a few hundred at a time, in submission order, once collect polls
        writer = write_later(
            settings, run_id, [ids[i : i + 300] for i in range(0, MAPS, 300)], watch.first_seen
        )
        results = producer.collect(ids, timeout=60)
        writer.join(60)
    # Then every result came back in order, and no MGET carried more than a window of keys
    assert_ok_in_order(results, ids)
    assert watch.sizes[0] == WINDOW  # the first poll found 5,000 pending
    assert max(watch.sizes) <= WINDOW


def test_results_of_the_newest_maps_written_before_the_oldest_still_arrive(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    settings = redis_settings(module_redis, tmp_path)
    run_id = uuid.uuid4().hex
    ids = image_ids(MAPS)
    newest, oldest = ids[MAPS // 2 :], ids[: MAPS // 2]
    write_results(settings, run_id, newest)
    with Producer(settings, run_id=run_id) as producer, mget_sizes(module_redis) as watch:
        # When the newest half is done first and the oldest half completes last-submitted first
        backwards = oldest[::-1]
        chunks = [backwards[i : i + 250] for i in range(0, len(backwards), 250)]
        writer = write_later(settings, run_id, chunks, watch.first_seen)
        results = producer.collect(ids, timeout=60)
        writer.join(60)
    # Then all of them arrive, in the order asked, a window at most per MGET
    assert_ok_in_order(results, ids)
    assert max(watch.sizes) <= WINDOW


def test_a_timeout_reports_exactly_the_results_that_arrived_even_outside_the_first_window(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    settings = redis_settings(module_redis, tmp_path)
    run_id = uuid.uuid4().hex
    ids = image_ids(MAPS)
    # Given results for none of the oldest window, and for a few maps far past it
    arrived = [ids[i] for i in (WINDOW, 1500, 2047, *range(3000, 3010), MAPS - 1)]
    failed = [ids[4000]]
    write_results(settings, run_id, [*arrived, *failed], failed=failed)
    # When collect times out
    with (
        Producer(settings, run_id=run_id) as producer,
        mget_sizes(module_redis) as watch,
        pytest.raises(CollectTimeoutError) as caught,
    ):
        producer.collect(ids, timeout=0.3)
    # Then it says how many are pending, and carries exactly the results that arrived
    error = caught.value
    assert (error.pending, error.total) == (MAPS - len(arrived) - 1, MAPS)
    assert f"{error.pending} of {MAPS} map results still pending" in str(error)
    results: list[MapResult] = error.results
    assert [r.image_id for r in results] == ids
    assert [r.image_id for r in results if r.ok] == arrived
    assert_ok_in_order([r for r in results if r.ok], arrived)
    assert results[4000].error is not None and results[4000].error.type == "InvalidMapError"
    still = [r for r in results if r.image_id not in arrived and r.image_id not in failed]
    assert {(r.error.type, r.error.message) for r in still if r.error is not None} == {
        ("TimeoutError", "result still pending")
    }
    # and even its last look at every pending id went a window at a time
    assert max(watch.sizes) <= WINDOW


def test_maps_whose_results_lie_past_the_window_are_not_sent_again_as_lost(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    module_redis.client(0).flushdb()
    settings = redis_settings(module_redis, tmp_path, restore_interval_s=1, background_publish=False)
    cam = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    ids = image_ids(3000)
    # The whole oldest window and a few far past it: polls stay on that window, never reading past it.
    lost = [*ids[:WINDOW], *ids[2500:2505]]
    with Producer(settings) as producer:
        producer.submit_many((image_id, cam) for image_id in ids)
        # Given a broker that lost every message, and results for all but those
        module_redis.client(0).delete(settings.queue)
        write_results(settings, producer.run_id, [i for i in ids if i not in lost])
        # When collect waits long enough for the broker to look idle twice
        with pytest.raises(CollectTimeoutError) as caught:
            producer.collect(ids, timeout=5)
        redelivery = producer._redelivery
        assert redelivery is not None
        # Then exactly the maps without a result were sent again, not those unread past the window
        assert redelivery.redelivered == len(lost)
    assert caught.value.pending == len(lost)
    assert [r.image_id for r in caught.value.results if not r.ok] == lost


def test_the_filesystem_result_backend_still_collects(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")  # no broker or result backend: files under home
    assert settings.effective_result_backend.startswith("file://")
    run_id = uuid.uuid4().hex
    ids = image_ids(2 * WINDOW + 100)
    missing = [ids[3], ids[WINDOW + 5]]
    write_results(settings, run_id, [i for i in ids if i not in missing], failed=[ids[-1]])
    with Producer(settings, run_id=run_id) as producer:
        with pytest.raises(CollectTimeoutError) as caught:
            producer.collect(ids, timeout=0.2)
        assert caught.value.pending == len(missing)
        assert [r.image_id for r in caught.value.results if not r.ok] == [*missing, ids[-1]]
        write_results(settings, run_id, missing)
        results = producer.collect(ids, timeout=30)
    assert results[-1].error is not None and results[-1].error.type == "InvalidMapError"
    assert_ok_in_order(results[:-1], ids[:-1])


class Logged(logging.Handler):
    """Sets ``seen`` once a record whose message contains ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_collect_goes_on_through_a_result_backend_restart_and_gets_every_result(tmp_path: Path) -> None:
    ids = image_ids(20)
    watch = Logged("cannot read results, retrying until the timeout")
    logger = logging.getLogger("actmap.producer")
    logger.addHandler(watch)
    outcome: dict[str, object] = {}
    with RedisServer(appendonly=True) as server:
        settings = redis_settings(server, tmp_path, background_publish=False, redeliver_buffer_mb=0)
        # Given half the results written, then the result backend down
        write_results(settings, "blip", ids[:10])
        server.stop()

        def collect() -> None:
            with Producer(settings, run_id="blip") as producer:
                try:
                    outcome["results"] = producer.collect(ids, timeout=60)
                except Exception as exc:
                    outcome["error"] = exc

        # When collect starts while it is down (in a thread: this one restarts Redis, which
        # dies with the thread that started it), and Redis comes back with the rest
        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        try:
            assert watch.seen.wait(60)
            server.start()
            write_results(settings, "blip", ids[10:])
            collector.join(120)
        finally:
            logger.removeHandler(watch)
    # Then collect kept trying, and has them all
    assert "error" not in outcome, outcome
    assert_ok_in_order(outcome["results"], ids)  # type: ignore[arg-type]


def test_when_the_result_backend_stays_down_collect_times_out_saying_why(tmp_path: Path) -> None:
    with RedisServer() as server:
        settings = redis_settings(server, tmp_path, background_publish=False, redeliver_buffer_mb=0)
        server.stop()
        with Producer(settings, run_id="down") as producer, pytest.raises(CollectTimeoutError) as raised:
            producer.collect(image_ids(3), timeout=1)
    error = raised.value
    assert "3 of 3 map results still pending after 1 s (run down); " in str(error)
    assert "Connection refused" in str(error)
    assert isinstance(error.__cause__, redis.ConnectionError)
    assert [r.ok for r in error.results] == [False] * 3


def test_collect_with_maps_the_broker_has_not_taken_times_out_within_its_own_timeout_saying_so(
    tmp_path: Path,
) -> None:
    with RedisServer() as server:
        settings = redis_settings(server, tmp_path, publish_timeout_s=1, flush_timeout_s=2)
        server.stop()
        with Producer(settings) as producer:
            pending = producer.submit("img/00000", np.zeros((4, 4), np.float32))
            # a CollectTimeoutError, not flush's BrokerError: the time was collect's to spend
            with pytest.raises(CollectTimeoutError) as raised:
                producer.collect([pending], timeout=1)
            assert re.search(
                r"1 of 1 map results still pending after 1 s \(run \w+\); 1 map\(s\) still unsent after 1 s "
                r"\(kept in the buffer, still publishing\): the broker is not taking messages: ",
                str(raised.value),
            ), str(raised.value)
            assert isinstance(raised.value.__cause__, BrokerError)
            # and close, which cannot publish it either, says it gives it up
            with pytest.raises(BrokerError, match=r"1 map\(s\) still unsent after .* s, discarded by close"):
                producer.close()
            # and what comes after close says the producer is closed
            with pytest.raises(BrokerError, match="producer is closed"):
                producer.submit("img/00001", np.zeros((4, 4), np.float32))
