"""worker.budget: how long a message may work, so that it is acknowledged before the broker hands it on."""

from __future__ import annotations

import pytest

from producer.errors import ConfigError
from producer.settings import Settings
from worker.budget import REDELIVERY_MARGIN_S, check_budget, longest_put_s, task_budget_s

S3 = {"storage_url": "s3://bucket/maps"}


def test_the_longest_s3_put_is_every_attempt_timing_out_with_botocores_capped_backoff_between() -> None:
    settings = Settings(**S3, storage_max_attempts=4, s3_connect_timeout_s=1, s3_read_timeout_s=2)
    assert longest_put_s(settings) == 4 * (1 + 2) + (2 + 4 + 8)
    many = Settings(**S3, storage_max_attempts=7, s3_connect_timeout_s=1, s3_read_timeout_s=1)
    assert longest_put_s(many) == 7 * 2 + (2 + 4 + 8 + 16 + 20 + 20)


def test_a_local_write_counts_for_one_second_whatever_the_s3_timeouts() -> None:
    assert longest_put_s(Settings(storage_url="file:///tmp/maps", s3_read_timeout_s=100)) == 1.0


def test_a_retry_has_the_first_attempts_budget_less_its_longest_wait() -> None:
    settings = Settings(**S3, visibility_timeout_s=100, retry_backoff_max_s=15)
    first = task_budget_s(settings, retried=False)
    assert first == 100 - longest_put_s(settings) - REDELIVERY_MARGIN_S
    assert task_budget_s(settings, retried=True) == first - 15


def test_the_default_settings_leave_a_retry_time_to_work() -> None:
    check_budget(Settings(**S3))
    check_budget(Settings())


def test_a_visibility_timeout_too_short_for_a_retry_is_refused_naming_every_setting_involved() -> None:
    # 20 s of backoff + 27 s for the longest PUT + 5 s of margin: 53 s leave one second, 52 none
    check_budget(Settings(**S3, visibility_timeout_s=53))
    with pytest.raises(ConfigError) as refused:
        check_budget(Settings(**S3, visibility_timeout_s=52))
    message = str(refused.value)
    for words in ("ACTMAP_VISIBILITY_TIMEOUT_S (52)", "ACTMAP_RETRY_BACKOFF_MAX_S (20)", "longest PUT (27 s"):
        assert words in message
