"""The background publisher in a process of its own (ACTMAP_BACKGROUND_PUBLISHER=process).

The same guarantees as the publisher thread, against a real Redis and real workers: every
map accepted is published once, in batches; a broker that is down fills the buffer, then
submit raises and flush says how many are unsent, and they go out when it returns; the
death of either process is handled: the producer's leaves its maps published, the
publisher's is reported by the next call.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import redis

from producer import BrokerError, CollectTimeoutError, Producer, Settings, publisher_process
from producer.errors import ConfigError
from producer.keys import result_id
from producer.wire import decode_map
from tests.integration.conftest import Stack
from tests.integration.test_result_poller import write_results
from tests.support.ports import poll_until
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def process_settings(server: RedisServer, home: Path, **overrides: object) -> Settings:
    return Settings(
        home=home,
        broker_url=server.url(4),
        result_backend=server.url(5),
        background_publisher="process",
        **overrides,  # type: ignore[arg-type]
    )


def queued_batches(client: redis.Redis, queue: str) -> list[list[str]]:
    """The image ids of each message in the queue, oldest first (kombu's envelope, msgpack body)."""
    batches = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu LPUSHes: the oldest is last
        envelope = json.loads(raw)
        args, _kwargs, _embed = msgpack.unpackb(base64.b64decode(envelope["body"]))
        batches.append(
            [decode_map(p, max_pixels=1 << 24, max_message_bytes=1 << 26).image_id for p in args[0]]
        )
    return batches


def maps(count: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    for i in range(count):
        yield f"img/{i:04d}", rng.random((24, 32), dtype=np.float32)


@pytest.fixture
def redis_db(module_redis: RedisServer) -> RedisServer:
    module_redis.client(4).flushdb()
    module_redis.client(5).flushdb()
    return module_redis


def test_every_map_is_published_once_in_order_in_batches_from_the_publisher_process(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    settings = process_settings(redis_db, tmp_path, batch_size=8)
    submitted = list(maps(50))
    with Producer(settings) as producer:
        for image_id, cam in submitted:
            producer.submit(image_id, cam)
        producer.flush(30)
        assert producer.unsent == 0
        child = producer._publisher._child  # type: ignore[union-attr]
    batches = queued_batches(redis_db.client(4), settings.queue)
    assert [i for batch in batches for i in batch] == [image_id for image_id, _ in submitted]
    assert max(len(batch) for batch in batches) <= 8
    # and close ended the publisher process cleanly
    assert child.returncode == 0


def test_the_workers_render_what_the_publisher_process_sends(local_stack: Stack) -> None:
    settings = local_stack.settings.model_copy(update={"background_publisher": "process"})
    submitted = list(maps(40))
    with Producer(settings) as producer:
        handles = [producer.submit(image_id, cam) for image_id, cam in submitted]
        results = producer.collect(handles, timeout=60)
    assert [r.image_id for r in results] == [image_id for image_id, _ in submitted]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]


def test_while_the_broker_is_down_maps_are_kept_then_submit_raises_when_full_and_all_go_out_when_it_returns(
    tmp_path: Path,
) -> None:
    # Given a Redis that is down
    server = RedisServer().start()
    try:
        server.stop()
        settings = process_settings(server, tmp_path, publish_buffer_maps=5, publish_timeout_s=1)
        submitted = list(maps(6))
        with Producer(settings) as producer:
            # When maps are submitted: the buffer takes five
            for image_id, cam in submitted[:5]:
                producer.submit(image_id, cam)
            # Then the sixth waits for room, and says why there is none
            with pytest.raises(BrokerError, match=r"publish buffer full \(5 maps unsent for 1 s\)"):
                producer.submit(*submitted[5])
            with pytest.raises(BrokerError, match=r"5 map\(s\) still unsent after 0.5 s"):
                producer.flush(0.5)
            assert producer.unsent == 5
            # and once Redis is back, the five are published, none twice
            server.start()
            producer.flush(60)
        assert queued_batches(server.client(4), settings.queue) == [[i for i, _ in submitted[:5]]]
    finally:
        server.close()


def test_when_the_publisher_process_dies_the_next_call_says_so_and_how_many_maps_it_held(
    tmp_path: Path,
) -> None:
    server = RedisServer().start()
    try:
        server.stop()  # a broker that is down: the maps stay in the publisher process
        settings = process_settings(server, tmp_path, publish_timeout_s=1)
        producer = Producer(settings)
        for image_id, cam in maps(3):
            producer.submit(image_id, cam)
        child = producer._publisher._child  # type: ignore[union-attr]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        with pytest.raises(BrokerError, match=r"publisher process exited \(code -9\); 3 map\(s\) it held"):
            producer.submit("img/next", np.zeros((4, 4), np.float32))
        with pytest.raises(BrokerError, match="publisher process exited"):
            producer.close()
    finally:
        server.close()


def test_when_the_producer_process_is_killed_the_publisher_process_still_publishes_what_it_accepted(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    # Given a producer process that submits 40 maps and is SIGKILLed at once, without a flush
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np
        from producer import Producer, Settings
        producer = Producer(Settings(
            home={str(tmp_path)!r}, broker_url={redis_db.url(4)!r}, result_backend={redis_db.url(5)!r},
            background_publisher="process", batch_size=8, publish_linger_s=2,
        ))
        for i in range(40):
            producer.submit(f"img/{{i:04d}}", np.full((16, 16), i / 40, dtype=np.float32))
        print(producer._publisher._child.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == -signal.SIGKILL, run.stderr
    child_pid = int(run.stdout.split()[0])
    # Then the publisher process publishes all 40, lingering or not, and exits
    queue = redis_db.client(4)
    poll_until(lambda: sum(map(len, queued_batches(queue, "actmap"))) >= 40, 60, "40 maps in the queue")
    poll_until(lambda: not _alive(child_pid), 30, "the publisher process to exit")
    published = [i for batch in queued_batches(queue, "actmap") for i in batch]
    assert published == [f"img/{i:04d}" for i in range(40)]


def test_a_publisher_process_stopped_half_way_through_a_map_is_killed_after_the_timeout_and_reported(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    # Given a publisher process that stops (SIGSTOP) and a map four times the pipe's size
    producer = Producer(process_settings(redis_db, tmp_path, flush_timeout_s=1))
    producer.submit("img/0000", np.zeros((4, 4), np.float32))
    producer.flush(30)
    child = producer._publisher._child  # type: ignore[union-attr]
    os.kill(child.pid, signal.SIGSTOP)
    try:
        # When it is submitted: the first MiB goes into the pipe, the rest cannot
        with pytest.raises(
            BrokerError, match=r"stopped reading for 1 s half-way through a map and was killed"
        ):
            producer.submit("img/0001", np.zeros((2048, 2048), np.float32))
        # Then the publisher process was ended (a half-written map is the end of its input)
        assert child.returncode == -signal.SIGKILL
        with pytest.raises(BrokerError, match=r"publisher process exited \(code -9\)"):
            producer.submit("img/0002", np.zeros((4, 4), np.float32))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        with contextlib.suppress(BrokerError):
            producer.close()


def test_a_publisher_process_that_reads_nothing_fails_submit_after_the_timeout_and_reads_on_when_it_resumes(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    # Given a stopped publisher process and a pipe of one page (small frames go in whole or not at all)
    producer = Producer(process_settings(redis_db, tmp_path, flush_timeout_s=1))
    publisher = producer._publisher
    assert isinstance(publisher, publisher_process.ProcessPublisher)
    fcntl.fcntl(publisher._to_child.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    os.kill(publisher._child.pid, signal.SIGSTOP)
    submitted = []
    try:
        # When maps are submitted until the pipe is full
        with pytest.raises(BrokerError, match=r"publisher process read nothing for 1 s; \d+ map\(s\) unsent"):
            for image_id, cam in maps(1000):
                producer.submit(image_id, cam)
                submitted.append(image_id)
    finally:
        os.kill(publisher._child.pid, signal.SIGCONT)
    # Then nothing half-written was left behind: once it resumes, it publishes every map accepted
    producer.close()
    assert 0 < len(submitted) < 1000
    assert [i for batch in queued_batches(redis_db.client(4), "actmap") for i in batch] == submitted


def test_a_publisher_process_given_a_corrupt_frame_publishes_the_maps_before_it_says_so_and_exits(
    redis_db: RedisServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    producer = Producer(process_settings(redis_db, tmp_path))
    publisher = producer._publisher
    assert isinstance(publisher, publisher_process.ProcessPublisher)
    for image_id, cam in maps(3):
        producer.submit(image_id, cam)
    # Given a frame no producer writes (a bare int), where a map would come
    os.write(publisher._to_child.fileno(), msgpack.packb(7))
    child = publisher._child
    child.wait(timeout=60)
    # Then it published the three maps before it, said what it read, and exited with an error
    assert child.returncode == 1
    assert "the producer's input is corrupt (TypeError" in capfd.readouterr().err
    assert [i for batch in queued_batches(redis_db.client(4), "actmap") for i in batch] == [
        image_id for image_id, _ in maps(3)
    ]
    # and the next call says so, counting none of those three as lost
    with pytest.raises(BrokerError, match=r"publisher process exited \(code 1\); 0 map\(s\) it held"):
        producer.submit("img/next", np.zeros((4, 4), np.float32))
    producer.close()  # nothing unsent: closes without an error


def test_maps_the_broker_lost_are_sent_again_by_the_publisher_process_which_kept_them(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    settings = process_settings(redis_db, tmp_path, restore_interval_s=1)
    ids = [f"img/{i:04d}" for i in range(20)]
    lost = ids[5:8]
    cam = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    queue = redis_db.client(4)
    with Producer(settings) as producer:
        for image_id in ids:
            producer.submit(image_id, cam)
        producer.flush(30)
        # Given a broker that lost every message, and results for all but three maps
        queue.delete(settings.queue)
        write_results(settings, producer.run_id, [i for i in ids if i not in lost])
        # When collect waits long enough for the broker to look idle twice
        with pytest.raises(CollectTimeoutError):
            producer.collect(ids, timeout=5)
        # Then the publisher process sent those three again, and only those
        poll_until(lambda: queue.llen(settings.queue) > 0, 30, "the lost maps sent again")
    assert [i for batch in queued_batches(queue, settings.queue) for i in batch] == lost


def test_a_resend_waiting_on_a_broker_that_is_down_does_not_keep_the_publisher_process_from_reading(
    tmp_path: Path,
) -> None:
    server = RedisServer().start()
    try:
        # Given maps published and kept, then a broker that goes down
        settings = process_settings(server, tmp_path, publish_timeout_s=5, flush_timeout_s=1)
        producer = Producer(settings)
        publisher = producer._publisher
        assert isinstance(publisher, publisher_process.ProcessPublisher)
        ids = [image_id for image_id, _ in maps(3)]
        for image_id, cam in maps(3):
            producer.submit(image_id, cam)
        producer.flush(30)
        server.stop()
        # When collect asks for them to be sent again (they wait on the broker for 5 s), and a
        # map four times the pipe's size follows at once, with 1 s to go into it
        publisher.resend([result_id(producer.run_id, image_id, None) for image_id in ids])
        producer.submit("img/big", np.zeros((2048, 2048), np.float32))
        # Then it went in whole, and once Redis is back the big map is published
        server.start()
        producer.close()
        assert publisher._child.returncode == 0
        published = [i for batch in queued_batches(server.client(4), settings.queue) for i in batch]
        assert "img/big" in published
    finally:
        server.close()


def test_a_publisher_process_that_cannot_start_fails_the_producer_with_its_exit_code(
    redis_db: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Python that exits at once stands for one that cannot import actmap's dependencies.
    monkeypatch.setattr(
        publisher_process, "_child_command", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"]
    )
    with pytest.raises(ConfigError, match=r"publisher process did not start \(exit code 3"):
        Producer(process_settings(redis_db, tmp_path))


def test_a_producer_that_is_closed_refuses_more_maps(redis_db: RedisServer, tmp_path: Path) -> None:
    producer = Producer(process_settings(redis_db, tmp_path))
    producer.close()
    with pytest.raises(BrokerError, match="producer is closed"):
        producer.submit("img/late", np.zeros((4, 4), np.float32))
    assert producer.unsent == 0


def test_close_ends_the_publisher_process_even_while_a_process_forked_from_the_producer_holds_its_pipe(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    # Given a producer whose process forked (a data loader's workers, say) after it started
    producer = Producer(process_settings(redis_db, tmp_path))
    producer.submit("img/0000", np.zeros((4, 4), np.float32))
    forked = os.fork()
    if forked == 0:  # the forked process holds the pipe's write end, so no end of input comes
        time.sleep(120)
        os._exit(0)
    try:
        # When the producer closes
        producer.close()
        # Then the publisher process published and exited on its own, not killed
        assert producer._publisher._child.returncode == 0  # type: ignore[union-attr]
        assert sum(map(len, queued_batches(redis_db.client(4), "actmap"))) == 1
    finally:
        os.kill(forked, signal.SIGKILL)
        os.waitpid(forked, 0)


def _alive(pid: int) -> bool:
    """Whether the process runs (an exited one that nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
