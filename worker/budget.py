"""How long a task message may work: it must be acknowledged before the broker hands it on.

The broker gives a message that stays unacknowledged past its visibility timeout to another
worker. A retry waits unacknowledged for its countdown, then starts maps for at most its
budget, then finishes the PUTs under way: all of it must fit, with a margin. Pure functions
of the settings; a worker checks them as it starts.
"""

from __future__ import annotations

from producer.errors import ConfigError
from producer.settings import Settings

# Slack between the end of a message's work and the broker's redelivery of it.
REDELIVERY_MARGIN_S = 5
# What a write to a local folder counts for in that reckoning.
LOCAL_WRITE_S = 1.0


def longest_put_s(settings: Settings) -> float:
    """The longest one PUT can take: every attempt timing out, with botocore's backoff between."""
    if not settings.effective_storage_url.startswith("s3://"):
        return LOCAL_WRITE_S
    attempts = settings.storage_max_attempts
    backoff = sum(min(20.0, 2.0**k) for k in range(1, attempts))  # botocore standard mode, capped
    return attempts * (settings.s3_connect_timeout_s + settings.s3_read_timeout_s) + backoff


def task_budget_s(settings: Settings, *, retried: bool) -> float:
    """How long one task message may go on starting maps, and still be acknowledged in time."""
    waited = settings.retry_backoff_max_s if retried else 0
    return settings.visibility_timeout_s - waited - longest_put_s(settings) - REDELIVERY_MARGIN_S


def check_budget(settings: Settings) -> None:
    """ConfigError if a retried message would have less than a second to work."""
    if task_budget_s(settings, retried=True) < 1:
        raise ConfigError(
            f"ACTMAP_VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) leaves no time to render: it "
            f"must exceed ACTMAP_RETRY_BACKOFF_MAX_S ({settings.retry_backoff_max_s}) + the longest PUT "
            f"({longest_put_s(settings):g} s from ACTMAP_STORAGE_MAX_ATTEMPTS and the S3 timeouts) "
            f"+ {REDELIVERY_MARGIN_S} s by at least 1 s, or a second worker could take a map the first "
            "still works on"
        )
