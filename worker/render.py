"""Colorize an activation map with a colormap LUT and encode it as an 8-bit palette PNG.

Numpy and ISA-L (isal: deflate, CRC-32) only: no Celery, boto3 or Redis (not even Pillow),
so rendering is tested and timed on its own.
"""

from __future__ import annotations

import struct
from functools import cache

import numpy as np
import numpy.typing as npt
from isal import isal_zlib

from producer.intensity import to_intensities
from producer.wire import Scanlines, check_level
from worker.colormaps import lut

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_IDAT_BYTES = 1 << 30  # a chunk's length must stay below 2**31; real maps need one IDAT


def colorize(
    activation_map: object, colormap: str = "jet", fade_low_activation: bool = True
) -> npt.NDArray[np.uint8]:
    """Return the (h, w, 4) uint8 RGBA image of the map, bit-exact with Kolena's colorize_activation_map."""
    table = lut(colormap, fade_low_activation)
    intensities = to_intensities(activation_map)
    # np.take is the same lookup as table[intensities], and much faster for a 2D table.
    return np.take(table, intensities, axis=0)


def render_png(
    activation_map: object,
    colormap: str = "jet",
    fade_low_activation: bool = True,
    *,
    compress_level: int = 1,
) -> bytes:
    """Return the map as an 8-bit palette PNG whose RGBA decoding equals ``colorize(...)``.

    The intensities are the pixel indices, the LUT's RGB the PLTE chunk and its alpha the tRNS
    chunk; the map keeps its own size (Kolena scales an overlay to its image).

    The PNG is written here, not by Pillow: Pillow never filters palette images, while PNG's
    Sub filter turns a smooth map into small differences that deflate packs about half as
    large. The deflate is ISA-L's, a standard zlib stream; ``compress_level`` is its level, 0-3
    (docs/performance.md compares them).
    """
    check_level("compress_level", compress_level)
    lut(colormap, fade_low_activation)  # refuses unknown colormaps and non-bool fades first
    palette = _palette_chunks(colormap, bool(fade_low_activation))
    return _png(Scanlines.deflate(to_intensities(activation_map), compress_level), palette)


def png_from_scanlines(
    scanlines: Scanlines, colormap: str = "jet", fade_low_activation: bool = True
) -> bytes:
    """Return the palette PNG of a map that came as deflated scanlines (a map message's).

    The scanlines' zlib stream, checked by the wire format, becomes the IDAT as it is: the same
    PNG as ``render_png`` of the map at the level the producer deflated it, with no deflate here.
    """
    lut(colormap, fade_low_activation)  # refuses unknown colormaps and non-bool fades first
    return _png(scanlines, _palette_chunks(colormap, bool(fade_low_activation)))


def _png(scanlines: Scanlines, palette: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", scanlines.width, scanlines.height, 8, 3, 0, 0, 0)
    idat = scanlines.stream
    parts = [_PNG_SIGNATURE, _chunk(b"IHDR", header), palette]
    parts += [_chunk(b"IDAT", idat[i : i + _MAX_IDAT_BYTES]) for i in range(0, len(idat), _MAX_IDAT_BYTES)]
    parts.append(_IEND)
    return b"".join(parts)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))  # the same CRC-32 as zlib's, faster
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


_IEND = _chunk(b"IEND", b"")


@cache
def _palette_chunks(colormap: str, fade_low_activation: bool) -> bytes:
    """PLTE (all 256 RGB entries, so the bit depth is 8) and tRNS (all 256 alphas, even if opaque)."""
    table = lut(colormap, fade_low_activation)
    return _chunk(b"PLTE", table[:, :3].tobytes()) + _chunk(b"tRNS", table[:, 3].tobytes())
