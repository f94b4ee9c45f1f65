"""worker.backoff: how long a map whose storage failed waits before its next try."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import backoff as backoff_module
from worker.backoff import backoff_s


def _ceiling(retries: int, base_s: float, cap_s: float) -> float:
    # base_s >= 0.001 and cap_s <= 1000 below, so from 2**20 on the cap always wins.
    return cap_s if retries >= 20 else min(cap_s, base_s * 2 ** max(retries, 0))


@pytest.fixture
def bounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Record the interval each call draws from instead of drawing."""
    seen: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        seen.append((low, high))
        return high

    monkeypatch.setattr(backoff_module.random, "uniform", record)
    return seen


def test_the_interval_doubles_from_one_second_until_the_sixty_second_cap(
    bounds: list[tuple[float, float]],
) -> None:
    for retries in range(8):
        backoff_s(retries)
    assert bounds == [(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (30, 60), (30, 60)]


def test_base_and_cap_set_the_first_interval_and_the_last(bounds: list[tuple[float, float]]) -> None:
    backoff_s(0, base_s=3, cap_s=10)
    backoff_s(1, base_s=3, cap_s=10)
    backoff_s(2, base_s=3, cap_s=10)
    assert bounds == [(1.5, 3), (3, 6), (5, 10)]


@pytest.mark.parametrize("retries", [-1, -100])
def test_a_negative_retry_count_waits_like_the_first_retry(
    bounds: list[tuple[float, float]], retries: int
) -> None:
    backoff_s(retries)
    assert bounds == [(0.5, 1)]


@pytest.mark.parametrize("retries", [1023, 1024, 1100, 10**6, 10**18])
def test_any_number_of_retries_waits_within_the_cap_without_overflowing(retries: int) -> None:
    assert 30 <= backoff_s(retries) <= 60


@settings(database=None, deadline=None, max_examples=300)
@given(
    retries=st.integers(min_value=-10, max_value=5000),
    base_s=st.floats(min_value=0.001, max_value=10),
    cap_s=st.floats(min_value=0.01, max_value=1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_wait_is_always_between_half_the_ceiling_and_the_ceiling(
    retries: int, base_s: float, cap_s: float, seed: int
) -> None:
    random.seed(seed)
    ceiling = _ceiling(retries, base_s, cap_s)
    wait = backoff_s(retries, base_s=base_s, cap_s=cap_s)
    assert ceiling / 2 <= wait <= ceiling <= cap_s


def test_workers_that_failed_together_do_not_all_wait_the_same_time() -> None:
    random.seed(1234)
    waits = {backoff_s(3) for _ in range(20)}
    assert len(waits) > 10
    assert all(4 <= wait <= 8 for wait in waits)
