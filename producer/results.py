"""A map's result, as the worker records it and the producer reads it back.

The worker stores a small dict per map under the map's result id (see keys.result_id):
image id, map name, locator, ``bitmap_mask`` in Kolena's serialized form, width, height,
PNG bytes and checksum. A failed map's result carries the error's type and message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BITMAP_MASK_DATA_TYPE = "ANNOTATION/BITMAP_MASK"


def bitmap_mask(locator: str) -> dict[str, str]:
    """Kolena's serialized ``BitmapMask``."""
    return {"locator": locator, "data_type": BITMAP_MASK_DATA_TYPE}


def success_result(
    *, image_id: str, name: str | None, locator: str, width: int, height: int, size: int, checksum: str
) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "name": name,
        "locator": locator,
        "bitmap_mask": bitmap_mask(locator),
        "width": width,
        "height": height,
        "bytes": size,
        "checksum": checksum,
    }


@dataclass(frozen=True)
class MapError:
    type: str
    message: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True)
class MapResult:
    """One map's outcome: a stored PNG (``locator``, ``bitmap_mask``) or an ``error``."""

    image_id: str
    name: str | None
    locator: str | None = None
    bitmap_mask: dict[str, str] | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    checksum: str | None = None
    error: MapError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_success(cls, image_id: str, name: str | None, result: Mapping[str, Any]) -> MapResult:
        return cls(
            image_id=image_id,
            name=name,
            locator=result["locator"],
            bitmap_mask=dict(result["bitmap_mask"]),
            width=result["width"],
            height=result["height"],
            bytes=result["bytes"],
            checksum=result["checksum"],
        )

    @classmethod
    def from_failure(cls, image_id: str, name: str | None, error: object) -> MapResult:
        if isinstance(error, BaseException):
            failure = MapError(type(error).__name__, str(error))
        else:
            failure = MapError("UnknownError", repr(error))
        return cls(image_id=image_id, name=name, error=failure)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``actmap collect`` prints, one line per map."""
        return {
            "image_id": self.image_id,
            "name": self.name,
            "ok": self.ok,
            "locator": self.locator,
            "bitmap_mask": self.bitmap_mask,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
            "checksum": self.checksum,
            "error": None if self.error is None else {"type": self.error.type, "message": self.error.message},
        }
