"""The one settings object. Nothing else in actmap reads the environment.

Every field is read from ``ACTMAP_<FIELD>`` (e.g. ``ACTMAP_BROKER_URL``) and can be
overridden by keyword (the CLI passes its flags this way). Unset URLs fall back to the
embedded default: Celery's filesystem transport, its file result backend and a local
folder, all under ``home``, so one machine needs no server at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.scanlines import MAX_LEVEL

# Slack between the end of a message's work and the broker's redelivery of it.
REDELIVERY_MARGIN_S = 5
# What a write to a local folder counts for in that reckoning.
LOCAL_WRITE_S = 1.0


def _isal_level(range_text: str) -> WrapValidator:
    """Refuse a deflate level with the whole range in the message (pydantic's names one bound)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise ValueError(
                f"expected an ISA-L level, an int from {range_text}; received {value!r}"
            ) from exc

    return WrapValidator(check)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACTMAP_", extra="ignore", frozen=True)

    home: Path = Field(Path(".actmap"), description="Folder of the embedded broker, results and maps.")
    broker_url: str | None = Field(None, description="Celery broker; unset: filesystem transport under home.")
    result_backend: str | None = Field(None, description="Celery result backend; unset: files under home.")
    storage_url: str | None = Field(
        None, description="Where PNGs go: s3://bucket/prefix or file:///dir; unset: home/maps."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, SeaweedFS); unset: AWS."
    )
    s3_region: str | None = Field(None, description="S3 region; unset: boto3's default chain.")
    s3_client: Literal["boto3", "obstore"] = Field(
        "boto3",
        description="Workers' S3 client: boto3, or obstore (the obstore extra: a sixth of the CPU per PUT).",
    )
    s3_server_side_encryption: str | None = Field(
        None,
        description="S3 ServerSideEncryption for every PUT, e.g. AES256 or aws:kms; unset: bucket default.",
    )

    queue: str = Field("actmap", description="Celery queue the producer publishes to and workers consume.")
    result_expires_s: int = Field(86_400, ge=60, description="How long results stay in the result backend.")
    batch_size: int = Field(32, ge=1, le=4096, description="Most maps per Celery message the producer sends.")
    quantize: bool = Field(True, description="Send float maps as rint(x*255) uint8: same PNG, 4x smaller.")
    wire_compress_level: Annotated[int, _isal_level("0 (off) to 3")] = Field(
        2,
        ge=0,
        le=MAX_LEVEL,
        description="ISA-L deflate level (1-3) of version 1 map messages on the wire (0: off), off the "
        "caller's thread: 2 packs like zlib's 1, 3.5x faster.",
    )
    wire_version: int = Field(
        2,
        ge=1,
        le=2,
        description="Map message version the producer sends: 2 carries uint8 maps as deflated PNG "
        "scanlines (half the bytes, no deflate on the worker); 1 while older workers, which refuse 2, run.",
    )
    publish_timeout_s: float = Field(
        10.0, gt=0, description="How long a publish retries an unreachable broker."
    )
    background_publish: bool = Field(
        True, description="Publish in the background (a thread or a process): submit returns at once."
    )
    background_publisher: Literal["thread", "process"] = Field(
        "thread",
        description="Where the background publisher runs: a thread, or a process of its own (submit's p99 "
        "stays low even when the caller's loop holds the GIL in Python; one more process, ~1 s to start).",
    )
    publish_buffer_maps: int = Field(
        10_000, ge=1, description="Maps the background publisher holds before submit blocks."
    )
    publish_linger_s: float = Field(
        0.05, ge=0, description="How long the publisher waits for more maps to fill a message."
    )
    redeliver_lost: bool = Field(
        True, description="Redis broker: collect sends again maps the broker lost (see producer.redelivery)."
    )
    redeliver_buffer_mb: int = Field(
        256, ge=0, description="Packed maps kept for that until their result is collected, in MiB."
    )
    flush_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long flush and close wait for buffered maps to be published, and the longest "
        "a map may take to go into the publisher process's pipe.",
    )

    max_pixels: int = Field(4096 * 4096, ge=1, description="Largest map accepted, in pixels.")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest map message accepted.")
    png_compress_level: Annotated[int, _isal_level("0 to 3")] = Field(
        1,
        ge=0,
        le=MAX_LEVEL,
        description="ISA-L deflate level (0-3) of the PNG: 1 is about as fast as 0 and a fifth smaller. "
        "Maps sent as scanlines (wire version 2) are deflated by the producer, at its own setting.",
    )

    upload_threads: int = Field(4, ge=1, le=64, description="PUTs in flight per worker process.")
    log_each_map: bool = Field(
        False, description="Workers log one INFO line per map stored (else DEBUG; Celery logs each message)."
    )
    storage_max_attempts: int = Field(
        3, ge=1, le=10, description="S3 client attempts per PUT (total, first included)."
    )
    s3_connect_timeout_s: float = Field(2.0, gt=0, description="S3 connect timeout per attempt.")
    s3_read_timeout_s: float = Field(5.0, gt=0, description="S3 read timeout per attempt.")
    task_max_retries: int = Field(5, ge=0, description="Celery retries of maps whose storage still failed.")
    retry_backoff_max_s: int = Field(20, ge=1, description="Cap of the exponential backoff between retries.")
    visibility_timeout_s: int = Field(
        60,
        ge=5,
        description="Redis broker: seconds before a dead worker's unacknowledged maps are redelivered.",
    )
    restore_interval_s: int = Field(
        5, ge=1, description="Redis broker: seconds between sweeps for unacknowledged maps to redeliver."
    )

    @model_validator(mode="after")
    def _acknowledged_before_redelivery(self) -> Settings:
        # The broker hands a message that stays unacknowledged past the visibility timeout to
        # another worker. A retry waits unacknowledged for its countdown, then renders for at
        # most its budget, then finishes the PUTs under way: all of it must fit.
        if self.task_budget_s(retried=True) < 1:
            raise ValueError(
                f"visibility_timeout_s ({self.visibility_timeout_s}) leaves no time to render: it must "
                f"exceed retry_backoff_max_s ({self.retry_backoff_max_s}) + the longest PUT "
                f"({self.longest_put_s:g} s from storage_max_attempts and the S3 timeouts) "
                f"+ {REDELIVERY_MARGIN_S} s by at least 1 s"
            )
        return self

    @property
    def longest_put_s(self) -> float:
        """The longest one PUT can take: every attempt timing out, with botocore's backoff between."""
        if not self.effective_storage_url.startswith("s3://"):
            return LOCAL_WRITE_S
        attempts = self.storage_max_attempts
        backoff = sum(min(20.0, 2.0**k) for k in range(1, attempts))  # botocore standard mode, capped
        return attempts * (self.s3_connect_timeout_s + self.s3_read_timeout_s) + backoff

    def task_budget_s(self, *, retried: bool) -> float:
        """How long one task message may go on starting maps, and still be acknowledged in time."""
        waited = self.retry_backoff_max_s if retried else 0
        return self.visibility_timeout_s - waited - self.longest_put_s - REDELIVERY_MARGIN_S

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or f"file://{self.resolved_home / 'results'}"

    @property
    def effective_storage_url(self) -> str:
        # as_uri percent-encodes: open_storage unquotes, and a '#', '?' or '%' in home must survive.
        return self.storage_url or (self.resolved_home / "maps").as_uri()

    @property
    def broker_folder(self) -> Path:
        """The filesystem transport's message folder (embedded default only)."""
        return self.resolved_home / "broker"

    def uses_redis_broker(self) -> bool:
        return self.effective_broker_url.startswith(("redis://", "rediss://"))

    def uses_filesystem_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")
