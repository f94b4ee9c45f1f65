"""The map message: one activation map as its PNG image data, msgpack-encoded (docs/wire-format.md).

A map message is a msgpack map with these fields::

    v          int      2
    run        str      the producer's run id (results are keyed by run, image id and name)
    id         str      image id, a relative path such as "val/img-001"
    name       str|nil  map name when an image has several maps, else nil
    shape      [int]    [h, w]
    scanlines  bin      a zlib stream of h rows of 1 + w bytes: a PNG filter type, 0 (None)
                        or 1 (Sub), then the row's uint8 intensities so filtered
    colormap   str      "jet", "viridis", "inferno", "magma", "plasma", "turbo" or "gray"
    fade       bool     fade_low_activation

The scanlines are the PNG's IDAT as it is: the worker checks the stream and writes the PNG's
other chunks around it, without deflating the map again. Sub-filtered, a smooth map deflates to
about half the bytes of the same map deflated unfiltered. A Celery task message carries a list
of map messages, each a msgpack bin, so each map decodes on its own.

Pure numpy, msgpack and ISA-L: the producer packs, the worker unpacks and checks every field.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from producer.errors import ActmapError, InvalidMapError, MapDecodeError, WireFormatError
from producer.keys import validate_image_id, validate_map_name

VERSION = 2
# worker.colormaps.COLORMAP_NAMES, repeated so the producer validates without importing the worker.
COLORMAPS: tuple[str, ...] = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray")
FIELDS = frozenset({"v", "run", "id", "name", "shape", "scanlines", "colormap", "fade"})
FILTER_NONE = 0
FILTER_SUB = 1
MAX_LEVEL = isal_zlib.ISAL_BEST_COMPRESSION  # ISA-L's deflate levels are 0-3
_MAX_CINFO = 7  # a zlib header's largest window, 2**(7 + 8) = 32 KiB
# isal's stubs declare its error an instance; it is an exception class (igzip_lib.IsalError).
_INFLATE_ERRORS = (cast(type[Exception], isal_zlib.error), zlib.error)


def check_level(what: str, level: object) -> None:
    """Refuse a deflate level ISA-L does not have, naming ``what`` and the range."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"{what} is {level!r}; expected an int from 0 to {MAX_LEVEL} (ISA-L)")


def sub_filtered(intensities: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The (h, w + 1) scanlines of an (h, w) uint8 map: per row, filter byte 1 (Sub), then the differences."""
    height, width = intensities.shape
    flat = intensities.reshape(-1)
    # One pass over the whole map as a flat array, then each row's first byte put back: it has
    # no left neighbour. uint8 arithmetic wraps mod 256, as PNG's does.
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


@dataclass(frozen=True)
class MapMessage:
    """One map as the producer packs it: its (h, w) uint8 intensities."""

    run_id: str
    image_id: str
    name: str | None
    intensities: npt.NDArray[np.uint8]
    colormap: str = "jet"
    fade_low_activation: bool = True


@dataclass(frozen=True)
class DecodedMap:
    """One map as the worker reads it: its checked scanlines, ready to be the PNG's IDAT."""

    run_id: str
    image_id: str
    name: str | None
    scanlines: Scanlines
    colormap: str
    fade_low_activation: bool


def validate_colormap(colormap: object) -> str:
    if colormap not in COLORMAPS:
        raise InvalidMapError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    return str(colormap)


def encode_map(message: MapMessage, *, level: int = 1) -> bytes:
    """Pack a map message, its intensities Sub-filtered and deflated at ISA-L ``level`` (0-3).

    The intensities must be a valid map (see producer.intensity).
    """
    intensities = message.intensities
    if intensities.dtype != np.uint8 or intensities.shape[2:] not in ((), (1,)) or intensities.ndim < 2:
        raise InvalidMapError(
            f"a map message carries (h, w) uint8 intensities; received {intensities.dtype} "
            f"{intensities.shape}"
        )
    scanlines = Scanlines.deflate(intensities.reshape(intensities.shape[:2]), level)  # [h, w, 1] is [h, w]
    return msgpack.packb(
        {
            "v": VERSION,
            "run": message.run_id,
            "id": message.image_id,
            "name": message.name,
            "shape": list(scanlines.shape),
            "scanlines": scanlines.stream,
            "colormap": message.colormap,
            "fade": message.fade_low_activation,
        },
        use_bin_type=True,
    )


def decode_map(payload: object, *, max_pixels: int, max_message_bytes: int) -> DecodedMap:
    """Unpack and check a map message; raise MapDecodeError saying what is wrong."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MapDecodeError(f"map message must be bytes, received {type(payload).__name__}")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)  # len() of a view counts items
    if size > max_message_bytes:
        raise MapDecodeError(f"map message is {size} bytes; expected at most {max_message_bytes}")
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=max_message_bytes)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise MapDecodeError(f"map message is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(fields, Mapping):
        raise MapDecodeError(f"map message must be a msgpack map, received {type(fields).__name__}")
    identity = _identity(fields)
    try:
        return _message_from_fields(fields, max_pixels=max_pixels)
    except ActmapError as exc:
        raise MapDecodeError(str(exc), identity) from exc


def _identity(fields: Mapping[Any, Any]) -> tuple[str, str, str | None] | None:
    """Run, image id and name if readable: lets a bad map's failure reach its own result."""
    run, image_id, name = fields.get("run"), fields.get("id"), fields.get("name")
    if isinstance(run, str) and isinstance(image_id, str) and (name is None or isinstance(name, str)):
        return run, image_id, name
    return None


def _message_from_fields(fields: Mapping[Any, Any], *, max_pixels: int) -> DecodedMap:
    version = fields.get("v")
    if type(version) is not int or version != VERSION:  # not True, not 2.0
        raise WireFormatError(f"map message version is {version!r}; this worker reads version {VERSION}")
    missing = FIELDS - set(fields)
    if missing:
        raise WireFormatError(f"map message lacks field(s) {', '.join(sorted(missing))}")
    run = _typed(fields, "run", str)
    image_id = validate_image_id(fields["id"])
    name = validate_map_name(fields["name"])
    colormap = validate_colormap(fields["colormap"])
    fade = _typed(fields, "fade", bool)
    return DecodedMap(run, image_id, name, _scanlines(fields, max_pixels), colormap, fade)


def _scanlines(fields: Mapping[Any, Any], max_pixels: int) -> Scanlines:
    """Check a map's scanlines in full: the worker stores them as the PNG's IDAT."""
    height, width = _shape(fields["shape"], max_pixels)
    stream = _typed(fields, "scanlines", bytes)
    expected = height * (width + 1)
    what = f"shape {[height, width]} needs {height} rows of 1 + {width} bytes, {expected}"
    # ISA-L also inflates headers declaring a window over 32 KiB, which zlib, libpng and every
    # PNG reader refuse (RFC 1950: CINFO <= 7): such a stream would make an unreadable PNG.
    if stream[:1] and stream[0] >> 4 > _MAX_CINFO:
        raise WireFormatError(
            f"map scanlines are not a valid zlib stream for a PNG (header CMF 0x{stream[0]:02x}: a window "
            "over 32 KiB); expected a window of at most 32 KiB, as RFC 1950 and PNG require"
        )
    inflater = isal_zlib.decompressobj()
    try:
        # Bounded: a bomb stops one byte past the map (and a size past ssize_t at ssize_t's bound).
        data = inflater.decompress(stream, min(expected + 1, sys.maxsize))
    except _INFLATE_ERRORS as exc:
        raise WireFormatError(f"map scanlines are not a valid zlib stream ({exc})") from exc
    if len(data) > expected or inflater.unconsumed_tail:
        raise WireFormatError(f"map scanlines inflate to over {expected} bytes; {what}")
    if not inflater.eof:
        raise WireFormatError(
            f"map scanlines are a truncated zlib stream ({len(data)} bytes inflated); {what}"
        )
    if len(data) < expected:
        raise WireFormatError(f"map scanlines inflate to {len(data)} bytes; {what}")
    if inflater.unused_data:
        raise WireFormatError(
            f"map scanlines have {len(inflater.unused_data)} bytes after their zlib stream; expected none"
        )
    rows = np.frombuffer(data, dtype=np.uint8).reshape(height, width + 1)
    unknown = np.flatnonzero(rows[:, 0] > FILTER_SUB)
    if unknown.size:
        row = int(unknown[0])
        raise WireFormatError(
            f"map scanline {row} has filter type {rows[row, 0]}; expected 0 (None) or 1 (Sub)"
        )
    return Scanlines(rows, stream)


def _typed(fields: Mapping[Any, Any], key: str, kind: type[Any]) -> Any:
    value = fields[key]
    if not isinstance(value, kind):
        raise WireFormatError(f"map field {key!r} must be {kind.__name__}, received {type(value).__name__}")
    return value


def _shape(shape: object, max_pixels: int) -> tuple[int, int]:
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
    ):
        raise WireFormatError(f"map shape must be [h, w] of ints, received {shape!r}")
    height, width = shape
    if height <= 0 or width <= 0:
        raise InvalidMapError(f"map shape {list(shape)} is empty; expected h, w >= 1")
    if height * width > max_pixels:
        raise InvalidMapError(
            f"map shape {list(shape)} has {height * width} pixels; expected at most {max_pixels}"
        )
    return height, width
