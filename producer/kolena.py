"""Kolena objects from actmap results: ``BitmapMask``s, and inferences with their maps filled in.

Needs the ``kolena`` package (the ``kolena`` extra); the rest of actmap does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from producer.errors import MissingMapError
from producer.results import MapResult

if TYPE_CHECKING:
    from kolena.workflow.annotation import BitmapMask

__all__ = ["bitmap_mask", "bitmap_masks", "fill_activation_maps"]

_Inference = TypeVar("_Inference")


def bitmap_mask(result: MapResult) -> BitmapMask:
    """The Kolena ``BitmapMask`` of a successful result; for a failed one, MissingMapError with its error."""
    from kolena.workflow.annotation import BitmapMask

    if result.locator is None:
        raise MissingMapError(f"map of {result.image_id!r} failed: {result.error}")
    return BitmapMask(locator=result.locator)


def bitmap_masks(results: Iterable[MapResult]) -> dict[tuple[str, str | None], BitmapMask]:
    """``BitmapMask`` per (image id, map name), for the results that succeeded."""
    return {(r.image_id, r.name): bitmap_mask(r) for r in results if r.ok}


def fill_activation_maps(
    inferences: Sequence[_Inference],
    image_ids: Sequence[str],
    results: Iterable[MapResult],
    *,
    field: str = "activation_map",
    name: str | None = None,
    missing: str = "raise",
) -> list[_Inference]:
    """Copies of ``inferences`` (frozen dataclasses) with ``field`` set to their image's ``BitmapMask``.

    ``image_ids[i]`` is the image id of ``inferences[i]`` (Kolena pairs inferences with test
    samples in order, so these come from the test samples). ``name`` picks which map of an
    image when there are several. An inference without a successful map raises
    MissingMapError, or keeps its field as it was with ``missing="keep"``.
    """
    if missing not in ("raise", "keep"):
        raise ValueError(f"missing is {missing!r}; expected 'raise' or 'keep'")
    if len(image_ids) != len(inferences):
        raise ValueError(f"{len(inferences)} inferences but {len(image_ids)} image ids; expected one each")
    by_image: dict[str, MapResult] = {r.image_id: r for r in results if r.name == name}
    filled: list[_Inference] = []
    for inference, key in zip(inferences, image_ids, strict=True):
        result = by_image.get(key)
        if result is None or not result.ok:
            if missing == "keep":
                filled.append(inference)
                continue
            reason = "no result" if result is None else f"its map failed: {result.error}"
            raise MissingMapError(f"inference for image {key!r} has {reason}")
        changes: dict[str, Any] = {field: bitmap_mask(result)}
        filled.append(dataclasses.replace(inference, **changes))  # type: ignore[type-var]
    return filled
