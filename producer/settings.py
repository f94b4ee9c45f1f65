"""The one settings object. Nothing else in actmap reads the environment.

Every field is read from ``ACTMAP_<FIELD>`` (e.g. ``ACTMAP_BROKER_URL``) and can be
overridden by keyword (the CLI passes its flags this way). Unset URLs fall back to the
embedded default: Celery's filesystem transport, its file result backend and a local
folder, all under ``home``, so one machine needs no server at all. docs/settings.md is
generated from these fields (scripts/generate_settings_doc.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.wire import MAX_LEVEL


def _isal_level() -> WrapValidator:
    """Refuse a deflate level with the whole range in the message (pydantic's names one bound)."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise ValueError(f"expected an ISA-L level, an int from 0 to 3; received {value!r}") from exc

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
        "boto3", description="Workers' S3 client: boto3, or obstore (needs the obstore extra)."
    )
    s3_server_side_encryption: str | None = Field(
        None,
        description="S3 server-side encryption of every PUT, e.g. AES256 or aws:kms; unset: the bucket's.",
    )

    queue: str = Field("actmap", description="Celery queue the producer publishes to and workers consume.")
    result_expires_s: int = Field(86_400, ge=60, description="How long results stay in the result backend.")
    batch_size: int = Field(32, ge=1, le=4096, description="Most maps per Celery message the producer sends.")
    publish_timeout_s: float = Field(
        10.0, gt=0, description="How long a publish retries an unreachable broker."
    )
    background_publish: bool = Field(
        True, description="Publish from a background thread, so submit returns at once."
    )
    publish_buffer_maps: int = Field(
        10_000, ge=1, description="Maps the background publisher holds before submit blocks."
    )
    publish_linger_s: float = Field(
        0.05, ge=0, description="How long the publisher waits for more maps to fill a message."
    )
    flush_timeout_s: float = Field(
        60.0, gt=0, description="How long flush and close wait for buffered maps to be published."
    )
    redeliver_buffer_mb: int = Field(
        256,
        ge=0,
        description="Redis broker: MiB of sent maps kept to send again if the broker loses them; 0: off.",
    )

    max_pixels: int = Field(4096 * 4096, ge=1, description="Largest map accepted, in pixels.")
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest map message accepted.")
    png_compress_level: Annotated[int, _isal_level()] = Field(
        1, ge=0, le=MAX_LEVEL, description="Deflate level (0-3) at which the producer compresses each PNG."
    )

    upload_threads: int = Field(4, ge=1, le=64, description="PUTs in flight per worker process.")
    log_each_map: bool = Field(False, description="Workers log each map stored at INFO (else DEBUG).")
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
