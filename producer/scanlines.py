"""A uint8 map as a PNG's image data: its scanlines, each a filter type byte then the row's bytes.

Pure numpy and ISA-L, shared by the worker's PNG encoder and the wire format's version 2, which
carries a quantized map this way: a smooth map Sub-filtered deflates to half the bytes of the
map itself, and the worker can store the deflated scanlines as the PNG's IDAT without
deflating them again. Two of PNG's five filters are used, both undone in one numpy pass:
None (0), the row as it is, and Sub (1), each byte minus the byte to its left, mod 256.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from isal import isal_zlib

FILTER_NONE = 0
FILTER_SUB = 1
FILTERS = (FILTER_NONE, FILTER_SUB)
MAX_LEVEL = isal_zlib.ISAL_BEST_COMPRESSION  # ISA-L's deflate levels are 0-3


def check_level(what: str, level: object, lowest: str = "0") -> None:
    """Refuse a deflate level ISA-L does not have, naming ``what`` and the range (``lowest`` to 3)."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"{what} is {level!r}; expected an int from {lowest} to {MAX_LEVEL} (ISA-L)")


def sub_filtered(intensities: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The (h, w + 1) scanlines of an (h, w) uint8 map: per row, filter byte 1 (Sub), then the differences."""
    height, width = intensities.shape
    flat = intensities.reshape(-1)
    # One pass over the whole map as a flat array (per-row slices cost ~50% more at 224²),
    # then each row's first index put back: it has no left neighbour. uint8 wraps mod 256.
    differences = np.empty(height * width, dtype=np.uint8)
    np.subtract(flat[1:], flat[:-1], out=differences[1:])
    differences[::width] = flat[::width]
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = FILTER_SUB
    rows[:, 1:] = differences.reshape(height, width)
    return rows


def unfiltered(rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The (h, w) map of scanlines whose filter bytes are all None or Sub (as ``Scanlines`` checks)."""
    data = rows[:, 1:]
    sub = rows[:, 0] == FILTER_SUB
    intensities = np.array(data)
    # A Sub row is the running sum of its differences; a uint8 sum wraps mod 256 as PNG's does.
    intensities[sub] = np.cumsum(data[sub], axis=1, dtype=np.uint8)
    return intensities


@dataclass(frozen=True)
class Scanlines:
    """A map's PNG image data: ``rows`` (h, w + 1) uint8, filter bytes None or Sub, and ``stream``,
    their zlib stream, which is the PNG's IDAT as it is."""

    rows: npt.NDArray[np.uint8]
    stream: bytes

    @classmethod
    def deflate(cls, intensities: npt.NDArray[np.uint8], level: int) -> Scanlines:
        """Sub-filter an (h, w) uint8 map and deflate it with ISA-L at ``level`` (0-3)."""
        check_level("deflate level", level)
        rows = sub_filtered(intensities)
        # The rows are the only copy of the map; ISA-L reads them through the buffer protocol.
        return cls(rows, isal_zlib.compress(rows.data, level))

    @property
    def height(self) -> int:
        return int(self.rows.shape[0])

    @property
    def width(self) -> int:
        return int(self.rows.shape[1]) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def intensities(self) -> npt.NDArray[np.uint8]:
        return unfiltered(self.rows)
