"""The map message: one activation map, msgpack-encoded, versioned.

A map message is a msgpack map with these fields (version 1)::

    v         int    1
    run       str    the producer's run id (results are keyed by run, image id and name)
    id        str    image id, a relative path such as "val/img-001"
    name      str|nil  map name when an image has several maps, else nil
    dtype     str    "uint8", "float16", "float32" or "float64" (little-endian)
    shape     [int]  [h, w] or [h, w, 1]
    data      bin    the array's raw C-order bytes: h * w * itemsize of them
    colormap  str    "jet", "viridis", "inferno", "magma", "plasma", "turbo" or "gray"
    fade      bool   fade_low_activation

Version 2 carries a uint8 map as a PNG's image data instead of ``dtype`` and ``data``::

    v          int    2
    shape      [int]  [h, w]
    scanlines  bin    a zlib stream of h rows of 1 + w bytes: a PNG filter type, 0 (None) or
                      1 (Sub), then the row's intensities so filtered (producer.scanlines)

with run, id, name, colormap and fade as in version 1. A smooth map Sub-filtered deflates to
about half the bytes of the same map deflated as it is, and the worker stores the stream as
the PNG's IDAT without deflating it again. The Python producer sends version 2 for every
map that is uint8 once quantized, deflated by ISA-L at ``ACTMAP_PNG_COMPRESS_LEVEL``
(``ACTMAP_WIRE_VERSION=1`` keeps version 1, for workers of releases that refuse version 2).

A Celery task message carries a list of these as binary strings, so a batch of maps
costs one broker message and each map stays decodable (and fuzzable) on its own. Each may
be sent as a zlib stream (RFC 1950) of the msgpack bytes instead: a msgpack map begins with
a byte 0x80-0x8f, 0xde or 0xdf, a zlib stream with 0x78, so the first byte tells which.
The producer does so for version 1 (smooth maps deflate about 4x, which is 4x less for the
broker to carry and encode), not for version 2, whose bulk is deflated already. Any zlib
stream is read, whatever wrote it; actmap writes it with ISA-L (isal), at its default level 2
~3.5x faster than zlib's level 1 for the same bytes, and inflates with ISA-L, ~2x faster.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

import msgpack
import numpy as np
from isal import isal_zlib

from producer.errors import ActmapError, InvalidMapError, WireFormatError
from producer.keys import validate_image_id, validate_map_name
from producer.scanlines import FILTERS, MAX_LEVEL, Scanlines, check_level

ARRAY_VERSION = 1  # the map's own bytes, any dtype
SCANLINES_VERSION = 2  # a uint8 map as deflated PNG scanlines
VERSIONS = (ARRAY_VERSION, SCANLINES_VERSION)
# worker.colormaps.COLORMAP_NAMES, repeated so the producer validates without importing the worker.
COLORMAPS: tuple[str, ...] = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray")
DTYPES: tuple[str, ...] = ("uint8", "float16", "float32", "float64")
_COMMON_FIELDS = {"v", "run", "id", "name", "shape", "colormap", "fade"}
_FIELDS = {
    ARRAY_VERSION: _COMMON_FIELDS | {"dtype", "data"},
    SCANLINES_VERSION: _COMMON_FIELDS | {"scanlines"},
}
MAX_COMPRESS_LEVEL = MAX_LEVEL  # ISA-L's 0-3; 0 here means not compressed
_MAX_CINFO = 7  # a zlib header's largest window, 2**(7 + 8) = 32 KiB
# isal's stubs declare its error an instance; it is an exception class (igzip_lib.IsalError).
_INFLATE_ERRORS = (cast(type[Exception], isal_zlib.error), zlib.error)


@dataclass(frozen=True)
class MapMessage:
    run_id: str
    image_id: str
    name: str | None
    array: np.ndarray | Scanlines  # Scanlines: a version 2 message's uint8 map
    colormap: str = "jet"
    fade_low_activation: bool = True


class MapDecodeError(WireFormatError):
    """Raised when a map message is invalid; carries the map's identity when it could be read."""

    def __init__(self, message: str, identity: tuple[str, str, str | None] | None = None) -> None:
        super().__init__(message)
        self.identity = identity


def validate_colormap(colormap: object) -> str:
    if colormap not in COLORMAPS:
        raise InvalidMapError(f"unknown colormap {colormap!r}; expected one of {', '.join(COLORMAPS)}")
    return str(colormap)


def encode_map(message: MapMessage) -> bytes:
    """Pack a map message: version 2 if its array is Scanlines, else version 1.

    The array must already be a valid map (see producer.intensity).
    """
    array = message.array
    if isinstance(array, Scanlines):
        return msgpack.packb(
            {
                "v": SCANLINES_VERSION,
                "run": message.run_id,
                "id": message.image_id,
                "name": message.name,
                "shape": list(array.shape),
                "scanlines": array.stream,
                "colormap": message.colormap,
                "fade": message.fade_low_activation,
            },
            use_bin_type=True,
        )
    if array.dtype.name not in DTYPES:
        raise InvalidMapError(f"dtype {array.dtype} cannot be sent; expected one of {', '.join(DTYPES)}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    fields = {
        "v": ARRAY_VERSION,
        "run": message.run_id,
        "id": message.image_id,
        "name": message.name,
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data": np.ascontiguousarray(array).data.cast("B"),
        "colormap": message.colormap,
        "fade": message.fade_low_activation,
    }
    return msgpack.packb(fields, use_bin_type=True)


def pack_map(message: MapMessage, *, version: int, png_level: int, compress_level: int) -> bytes:
    """The bytes a producer sends for a map: version 2 if ``version`` is 2 and the map is uint8,
    its scanlines deflated at ``png_level``; else version 1, compressed at ``compress_level``."""
    array = message.array
    check_level("wire compress level", compress_level, "0 (off)")
    check_level("PNG compress level", png_level, "0")
    if version == SCANLINES_VERSION and isinstance(array, np.ndarray) and array.dtype == np.uint8:
        intensities = array.reshape(array.shape[:2])  # [h, w, 1] is [h, w] with the same bytes
        return encode_map(replace(message, array=Scanlines.deflate(intensities, png_level)))
    return compress_map(encode_map(message), compress_level)


def compress_map(payload: bytes, level: int) -> bytes:
    """The zlib form of a packed map message, deflated by ISA-L at ``level`` 1-3; 0 leaves it as it is."""
    check_level("wire compress level", level, "0 (off)")
    return isal_zlib.compress(payload, level) if level > 0 else payload


def _inflate(payload: bytes | bytearray | memoryview, max_message_bytes: int) -> bytes:
    # ISA-L inflates any zlib stream, whatever level or library wrote it, about 2x faster than zlib.
    inflater = isal_zlib.decompressobj()
    try:
        # Bounded: a small stream must not unpack into more than a message may be.
        data = inflater.decompress(payload, max_message_bytes)
    except _INFLATE_ERRORS as exc:
        raise MapDecodeError(f"map message is not a valid zlib stream ({exc})") from exc
    if inflater.unconsumed_tail:
        raise MapDecodeError(f"map message inflates to over {max_message_bytes} bytes; expected at most that")
    if not inflater.eof:
        raise MapDecodeError("map message is a truncated zlib stream")
    return data


def decode_map(payload: object, *, max_pixels: int, max_message_bytes: int) -> MapMessage:
    """Unpack and check a map message; raise MapDecodeError saying what is wrong."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise MapDecodeError(f"map message must be bytes, received {type(payload).__name__}")
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)  # len() of a view counts items
    if size > max_message_bytes:
        raise MapDecodeError(f"map message is {size} bytes; expected at most {max_message_bytes}")
    if payload[:1] == b"\x78":
        payload = _inflate(payload, max_message_bytes)
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


def _message_from_fields(fields: Mapping[Any, Any], *, max_pixels: int) -> MapMessage:
    version = fields.get("v")
    if type(version) is not int or version not in VERSIONS:  # not True, not 1.0
        raise WireFormatError(
            f"map message version is {version!r}; this worker reads versions "
            f"{' and '.join(map(str, VERSIONS))}"
        )
    missing = _FIELDS[version] - set(fields)
    if missing:
        raise WireFormatError(f"map message lacks field(s) {', '.join(sorted(missing))}")
    run = _typed(fields, "run", str)
    image_id = validate_image_id(fields["id"])
    name = validate_map_name(fields["name"])
    colormap = validate_colormap(fields["colormap"])
    fade = _typed(fields, "fade", bool)
    array = _array(fields, max_pixels) if version == ARRAY_VERSION else _scanlines(fields, max_pixels)
    return MapMessage(run, image_id, name, array, colormap, fade)


def _array(fields: Mapping[Any, Any], max_pixels: int) -> np.ndarray:
    dtype_name = _typed(fields, "dtype", str)
    if dtype_name not in DTYPES:
        raise InvalidMapError(f"map dtype is {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    shape = _shape(fields["shape"], max_pixels)
    data = _typed(fields, "data", bytes)
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize  # exact: np.prod wraps around past 2**63
    if len(data) != expected:
        raise WireFormatError(
            f"map data is {len(data)} bytes; shape {list(shape)} of {dtype_name} needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _scanlines(fields: Mapping[Any, Any], max_pixels: int) -> Scanlines:
    """Check a version 2 map's scanlines in full: the worker stores them as the PNG's IDAT."""
    shape = fields["shape"]
    if isinstance(shape, list | tuple) and len(shape) != 2:
        raise WireFormatError(f"map shape of a version 2 message must be [h, w], received {shape!r}")
    height, width = _shape(shape, max_pixels)
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
        data = inflater.decompress(stream, expected + 1)  # bounded: a bomb stops one byte past the map
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
    unknown = np.flatnonzero(rows[:, 0] > max(FILTERS))  # None and Sub are 0 and 1
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


def _shape(shape: object, max_pixels: int) -> tuple[int, ...]:
    if (
        not isinstance(shape, list | tuple)
        or len(shape) not in (2, 3)
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
    ):
        raise WireFormatError(f"map shape must be [h, w] or [h, w, 1] of ints, received {shape!r}")
    if len(shape) == 3 and shape[2] != 1:
        raise InvalidMapError(
            f"map shape {list(shape)} has {shape[2]} channels; expected [h, w] or [h, w, 1]"
        )
    height, width = shape[0], shape[1]
    if height <= 0 or width <= 0:
        raise InvalidMapError(f"map shape {list(shape)} is empty; expected h, w >= 1")
    if height * width > max_pixels:
        raise InvalidMapError(
            f"map shape {list(shape)} has {height * width} pixels; expected at most {max_pixels}"
        )
    return tuple(shape)
