"""The background publisher: batches, keeps every map through broker failures, bounded waits."""

from __future__ import annotations

import threading

import pytest

from producer.errors import BrokerError
from producer.publisher import BackgroundPublisher


class Broker:
    """Stands in for the Celery publish call: records batches, fails while told to."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.down = threading.Event()
        self.attempts = 0

    def send(self, batch: list[bytes]) -> None:
        self.attempts += 1
        if self.down.is_set():
            raise OSError("connection refused")
        self.batches.append(list(batch))

    @property
    def published(self) -> list[bytes]:
        return [payload for batch in self.batches for payload in batch]


def payloads(n: int) -> list[bytes]:
    return [f"map-{i}".encode() for i in range(n)]


def test_every_map_put_is_published_once_in_order_in_batches_no_larger_than_the_batch_size() -> None:
    broker = Broker()
    publisher = BackgroundPublisher(broker.send, capacity=1000, batch_size=8, linger_s=0.001)
    for payload in payloads(100):
        publisher.put(payload, timeout_s=5)
    publisher.close(timeout_s=30)
    assert broker.published == payloads(100)
    assert max(len(b) for b in broker.batches) <= 8
    assert publisher.unsent == 0


def test_maps_put_while_the_broker_is_down_are_kept_and_published_when_it_returns() -> None:
    # Given a broker that refuses everything
    broker = Broker()
    broker.down.set()
    publisher = BackgroundPublisher(broker.send, capacity=1000, batch_size=4, linger_s=0)
    for payload in payloads(10):
        publisher.put(payload, timeout_s=5)
    # When flush runs out of time, it says how many maps are still unsent
    with pytest.raises(BrokerError, match=r"10 map\(s\) still unsent .* connection refused"):
        publisher.flush(timeout_s=0.5)
    assert publisher.unsent == 10
    assert broker.attempts >= 1
    # Then once the broker is back, all of them are published, none twice
    broker.down.clear()
    publisher.close(timeout_s=30)
    assert broker.published == payloads(10)


def test_put_raises_when_the_buffer_stays_full_for_its_timeout() -> None:
    broker = Broker()
    broker.down.set()
    publisher = BackgroundPublisher(broker.send, capacity=3, batch_size=1, linger_s=0)
    for payload in payloads(3):
        publisher.put(payload, timeout_s=5)
    with pytest.raises(BrokerError, match=r"publish buffer full \(3 maps unsent for 0.2 s\)"):
        publisher.put(b"one too many", timeout_s=0.2)
    broker.down.clear()
    publisher.close(timeout_s=30)
    assert broker.published == payloads(3)


def test_nothing_can_be_put_after_close() -> None:
    broker = Broker()
    publisher = BackgroundPublisher(broker.send, capacity=10, batch_size=2, linger_s=0)
    publisher.close(timeout_s=5)
    with pytest.raises(BrokerError, match="closed"):
        publisher.put(b"late", timeout_s=1)


def test_a_map_whose_put_a_ctrl_c_cut_short_after_it_was_buffered_is_counted_and_flush_publishes_it() -> None:
    # Given a publisher asleep with an empty buffer, and a put a KeyboardInterrupt ended right
    # after its append, before it woke the publisher (the append alone, as it leaves things)
    broker = Broker()
    publisher = BackgroundPublisher(broker.send, capacity=1000, batch_size=8, linger_s=0)
    publisher.put(b"map-0", timeout_s=5)
    publisher.flush(timeout_s=30)
    publisher._buffer.append(b"map-1")
    # Then the map counts as unsent, and flush wakes the publisher and waits for it
    assert publisher.unsent == 1
    publisher.flush(timeout_s=30)
    assert broker.published == [b"map-0", b"map-1"]
    assert publisher.unsent == 0
    publisher.close(timeout_s=30)


def test_a_flush_that_runs_out_of_time_on_a_slow_but_working_broker_does_not_blame_the_broker() -> None:
    release = threading.Event()
    publisher = BackgroundPublisher(lambda batch: release.wait(30), capacity=1000, batch_size=8, linger_s=0)
    publisher.put(b"map-0", timeout_s=5)
    with pytest.raises(
        BrokerError, match=r"1 map\(s\) still unsent .* publishing is slower than maps are submitted$"
    ):
        publisher.flush(timeout_s=0.05)
    release.set()
    publisher.close(timeout_s=30)
    assert publisher.unsent == 0


def test_close_says_it_discards_the_maps_it_could_not_publish_in_time() -> None:
    broker = Broker()
    broker.down.set()
    publisher = BackgroundPublisher(broker.send, capacity=1000, batch_size=4, linger_s=0)
    for payload in payloads(3):
        publisher.put(payload, timeout_s=5)
    with pytest.raises(
        BrokerError, match=r"3 map\(s\) still unsent after 0.2 s, discarded by close: .*refused"
    ):
        publisher.close(timeout_s=0.2)
