"""A Ctrl-C in the middle of ``submit`` (a notebook's "interrupt" is the same SIGINT).

The caller may catch the KeyboardInterrupt and go on: each map is then either handed over
whole, and published, or not at all, and the producer keeps working.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.broker_queue import queued_batches
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_db(module_redis: RedisServer) -> RedisServer:
    module_redis.client(4).flushdb()
    module_redis.client(5).flushdb()
    return module_redis


def test_a_ctrl_c_during_submit_hands_each_map_over_whole_or_not_at_all_and_the_producer_goes_on(
    redis_db: RedisServer, tmp_path: Path
) -> None:
    # Given a producer process submitting 1024² maps while a thread Ctrl-C's its main thread
    # every 5-30 ms, and a loop that takes each KeyboardInterrupt from submit and goes on
    script = textwrap.dedent(
        f"""
        import json, random, signal, threading
        import numpy as np
        from producer import Producer, Settings
        inside = [False]
        def interrupt(signum, frame):  # KeyboardInterrupt, but only from within submit
            if inside[0]:
                inside[0] = False
                raise KeyboardInterrupt
        signal.signal(signal.SIGINT, interrupt)
        producer = Producer(Settings(
            home={str(tmp_path)!r}, broker_url={redis_db.url(4)!r}, result_backend={redis_db.url(5)!r},
            batch_size=4,
        ))
        ramp = np.add.outer(np.linspace(0, 0.5, 1024), np.linspace(0, 0.5, 1024)).astype(np.float32)
        main, stop = threading.main_thread().ident, threading.Event()
        def ctrl_c():
            while not stop.wait(random.uniform(0.005, 0.03)):
                signal.pthread_kill(main, signal.SIGINT)
        threading.Thread(target=ctrl_c, daemon=True).start()
        returned, interrupted = [], []
        i = 0
        while i < 3000 and (len(returned) < 20 or len(interrupted) < 20):
            image_id = f"img/{{i:04d}}"
            i += 1
            try:
                inside[0] = True
                producer.submit(image_id, ramp)
                inside[0] = False
                returned.append(image_id)
            except KeyboardInterrupt:
                interrupted.append(image_id)
        stop.set()
        inside[0] = False
        producer.close()
        print(json.dumps({{"returned": returned, "interrupted": interrupted}}))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    # Then close published everything it accepted, without an error
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    returned, interrupted = outcome["returned"], outcome["interrupted"]
    assert len(interrupted) >= 20, outcome
    # and the queue holds each map whose submit returned, once, and no other but those
    # interrupted once handed over (a Ctrl-C then means "stop after this map")
    published = [i for batch in queued_batches(redis_db.client(4), "actmap") for i in batch]
    assert len(published) == len(set(published))
    assert set(returned) <= set(published) <= set(returned) | set(interrupted)
