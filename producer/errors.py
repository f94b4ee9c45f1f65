"""Every error actmap raises, one rooted tree.

    ActmapError
    ├── PermanentError            never retried: the same input fails the same way
    │   ├── InvalidMapError       the activation map (array, dtype, shape, values, options)
    │   ├── InvalidImageIdError   an image id that is not a safe object key
    │   ├── InvalidMapNameError   a map name that is not a short identifier
    │   ├── WireFormatError       a message that is not a valid actmap map message
    │   │   └── MapDecodeError    … carrying the map's identity when it could be read
    │   └── StorageRejectedError  the store refused for good (no such bucket, access denied)
    ├── TransientError            retried with backoff, up to a bound
    │   ├── StorageError          the store did not take the object
    │   └── BrokerError           the broker did not take the message
    ├── CollectTimeoutError       results still pending when collect's time ran out
    ├── MissingMapError           an image without a successful map (producer.kolena)
    └── ConfigError               a setting that cannot work

Each class passes its message to ``Exception.__init__`` so that Celery's result
backend can carry the type and message to the producer.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActmapError",
    "BrokerError",
    "CollectTimeoutError",
    "ConfigError",
    "InvalidImageIdError",
    "InvalidMapError",
    "InvalidMapNameError",
    "MapDecodeError",
    "MissingMapError",
    "PermanentError",
    "StorageError",
    "StorageRejectedError",
    "TransientError",
    "WireFormatError",
]


class ActmapError(Exception):
    """Raised for every failure actmap itself reports."""


class PermanentError(ActmapError):
    """Raised when retrying cannot help: the input itself is wrong."""


class InvalidMapError(PermanentError):
    """Raised when an activation map is not a 2D uint8 or [0, 1] float array, or its options are unknown."""


class InvalidImageIdError(PermanentError):
    """Raised when an image id could not be a key inside the storage prefix."""


class InvalidMapNameError(PermanentError):
    """Raised when a map name is not 1 to 48 characters of A-Z a-z 0-9 . _ -."""


class WireFormatError(PermanentError):
    """Raised when a message is not msgpack, has the wrong fields, or its bytes do not match its shape."""


class MapDecodeError(WireFormatError):
    """Raised when a map message is invalid; carries the map's (run, image id, name) when it could be read."""

    def __init__(self, message: str, identity: tuple[str, str, str | None] | None = None) -> None:
        super().__init__(message)
        self.identity = identity


class StorageRejectedError(PermanentError):
    """Raised when the store refuses a write for a reason a retry cannot fix."""


class TransientError(ActmapError):
    """Raised when a dependency failed in a way that may pass: worth retrying."""


class StorageError(TransientError):
    """Raised when the store did not accept a PNG after the client's own retries."""


class BrokerError(TransientError):
    """Raised when the broker could not be reached to publish a message in time."""


class CollectTimeoutError(ActmapError):
    """Raised when collect's timeout passed with results still pending; carries what did arrive."""

    def __init__(self, message: str, pending: int = 0, total: int = 0) -> None:
        super().__init__(message, pending, total)
        self.pending = pending
        self.total = total
        self.results: list[Any] = []  # one MapResult per item; pending ones carry a TimeoutError

    def __str__(self) -> str:
        return str(self.args[0])


class MissingMapError(ActmapError):
    """Raised when an image has no successful map among the results it is assembled from."""


class ConfigError(ActmapError):
    """Raised when a setting cannot work, such as a storage URL of an unknown scheme."""
