"""actmap producer: send activation maps to the workers and collect their BitmapMask results.

Importing this package is cheap: the client (and with it Celery) loads on first use of
``Producer``, and Pillow and boto3 are never imported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.errors import (
    ActmapError,
    BrokerError,
    CollectTimeoutError,
    ConfigError,
    InvalidImageIdError,
    InvalidMapError,
    InvalidMapNameError,
    MapDecodeError,
    MissingMapError,
    PermanentError,
    StorageError,
    StorageRejectedError,
    TransientError,
    WireFormatError,
)
from producer.results import MapError, MapResult
from producer.settings import Settings

if TYPE_CHECKING:
    from producer.client import PendingMap, Producer

__all__ = [
    "ActmapError",
    "BrokerError",
    "CollectTimeoutError",
    "ConfigError",
    "InvalidImageIdError",
    "InvalidMapError",
    "InvalidMapNameError",
    "MapDecodeError",
    "MapError",
    "MapResult",
    "MissingMapError",
    "PendingMap",
    "PermanentError",
    "Producer",
    "Settings",
    "StorageError",
    "StorageRejectedError",
    "TransientError",
    "WireFormatError",
]

_CLIENT_NAMES = {"PendingMap", "Producer"}


def __getattr__(name: str) -> Any:
    # The pure modules (wire format, keys, intensity) are imported by the workers too;
    # loading Celery only when the client is asked for keeps them free of it.
    if name in _CLIENT_NAMES:
        from producer import client

        return getattr(client, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
