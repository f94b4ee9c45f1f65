"""When the producer sends maps again: only missing ones, only once the broker is confirmed idle."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from producer.errors import BrokerError
from producer.redelivery import Redelivery


class Broker:
    def __init__(self) -> None:
        self.idle = False
        self.refuses = False
        self.sent: list[list[bytes]] = []

    def send(self, payloads: Sequence[bytes]) -> None:
        if self.refuses:
            raise BrokerError("could not publish")
        self.sent.append(list(payloads))


def redelivery(broker: Broker, max_bytes: int = 1 << 20, batch_size: int = 32) -> Redelivery:
    return Redelivery(
        broker.send, lambda: broker.idle, max_bytes=max_bytes, batch_size=batch_size, check_every_s=0
    )


def test_missing_maps_are_sent_again_only_after_two_idle_checks_in_a_row() -> None:
    broker = Broker()
    lost = redelivery(broker)
    lost.keep("r1", b"map-1")
    lost.keep("r2", b"map-2")
    assert lost.check(lambda: {"r1", "r2"}) == 0  # busy broker: maps may still be on their way
    broker.idle = True
    assert lost.check(lambda: {"r1", "r2"}) == 0  # idle once: could be the instant between pop and record
    assert lost.check(lambda: {"r2"}) == 1  # idle twice: nothing can still produce r2's result
    assert broker.sent == [[b"map-2"]]
    assert lost.check(lambda: {"r2"}) == 0  # the broker has work again: look anew first
    assert lost.redelivered == 1


def test_collected_maps_are_forgotten_and_never_sent_again() -> None:
    broker = Broker()
    broker.idle = True
    lost = redelivery(broker)
    lost.keep("r1", b"map-1")
    lost.collected(["r1"])
    lost.check(lambda: {"r1"})
    assert lost.check(lambda: {"r1"}) == 0
    assert broker.sent == []


@pytest.mark.parametrize("sizes", [[400, 400, 400], [1000, 10]])
def test_payloads_beyond_the_memory_bound_are_dropped_oldest_first(sizes: list[int]) -> None:
    broker = Broker()
    broker.idle = True
    lost = redelivery(broker, max_bytes=1000)
    for i, size in enumerate(sizes):
        lost.keep(f"r{i}", bytes(size))
    lost.check(lambda: {f"r{i}" for i in range(len(sizes))})
    lost.check(lambda: {f"r{i}" for i in range(len(sizes))})
    assert sum(len(p) for p in broker.sent[0]) <= 1000
    assert len(broker.sent[0][-1]) == sizes[-1]  # the newest is kept


def test_many_lost_maps_go_out_again_a_batch_to_a_message_in_the_order_kept() -> None:
    broker = Broker()
    broker.idle = True
    lost = redelivery(broker, batch_size=3)
    for i in range(7):
        lost.keep(f"r{i}", f"map-{i}".encode())
    lost.check(lambda: set())
    assert lost.check(lambda: [f"r{i}" for i in range(7)]) == 7
    assert broker.sent == [[b"map-0", b"map-1", b"map-2"], [b"map-3", b"map-4", b"map-5"], [b"map-6"]]


def test_lost_maps_the_broker_refuses_to_take_again_are_kept_for_a_later_check() -> None:
    # Given a broker idle on two checks that refuses the resend, when it takes messages again,
    # then the next confirmed-idle check sends the lost map.
    broker = Broker()
    broker.idle = True
    lost = redelivery(broker)
    lost.keep("r1", b"map-1")
    broker.refuses = True
    lost.check(lambda: ["r1"])
    assert lost.check(lambda: ["r1"]) == 0
    broker.refuses = False
    lost.check(lambda: ["r1"])
    assert lost.check(lambda: ["r1"]) == 1
    assert broker.sent == [[b"map-1"]]
