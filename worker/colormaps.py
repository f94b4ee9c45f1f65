"""Colormap lookup tables: 256 RGBA rows, one per uint8 intensity.

Numpy only. Colorizing is ``lut(...)[intensities]``; the tables are built once and cached.

``jet`` is Kolena's ``ColormapJet``, computed from its formula (bit-exact; matplotlib's jet differs).
The others are matplotlib's colormaps at 256 levels, their RGB exactly matplotlib's
``cmap(np.arange(256), bytes=True)``, stored in ``worker.colormap_data.matplotlib_rgb`` by
scripts/generate_colormaps.py, so matplotlib is never imported here. Every colormap gets the same
alpha: Kolena's fade curve with ``fade_low_activation``, else 255.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import numpy.typing as npt

from producer.errors import InvalidMapError
from worker.colormap_data.matplotlib_rgb import RGB_HEX

_M = 255  # the top intensity; every breakpoint below is a fraction of it


def _jet_channel(x: float) -> int:
    """One Jet channel: a trapezoid rising over [M/8, 3M/8], flat to 5M/8, falling until 7M/8."""
    if x <= _M / 8:
        return 0
    if x <= 3 * _M / 8:
        return round((x - _M / 8) * _M / (_M / 4))
    if x <= 5 * _M / 8:
        return _M
    if x <= 7 * _M / 8:
        return round((x - 5 * _M / 8) * (-_M) / (_M / 4) + _M)
    return 0


def _jet_rgb(i: int) -> tuple[int, int, int]:
    # Python's round (halves to even) matters: several rows land exactly on .5.
    return _jet_channel(i - _M / 4), _jet_channel(i), _jet_channel(i + _M / 4)


def _fade_alpha(i: int) -> int:
    # A logistic ramp centred on M/2 hides low activations; int() truncates like Kolena's uint8 cast.
    return int(_M / (1 + math.exp((_M / 2 - i) / 8)))


COLORMAP_NAMES: tuple[str, ...] = ("jet", *RGB_HEX)


def lut(name: str, fade_low_activation: bool) -> npt.NDArray[np.uint8]:
    """Return the read-only (256, 4) uint8 RGBA table of colormap ``name``."""
    if not isinstance(name, str) or name not in COLORMAP_NAMES:
        raise InvalidMapError(f"unknown colormap {name!r}; expected one of {', '.join(COLORMAP_NAMES)}")
    if not isinstance(fade_low_activation, bool | np.bool_):
        raise InvalidMapError(
            f"fade_low_activation is {type(fade_low_activation).__name__} {fade_low_activation!r}; "
            "expected a bool"
        )
    return _build(name, bool(fade_low_activation))


def _rgb(name: str) -> npt.NDArray[np.uint8]:
    """The (256, 3) RGB of colormap ``name``."""
    if name == "jet":
        return np.array([_jet_rgb(i) for i in range(_M + 1)], dtype=np.uint8)
    # Read-only bytes; reshape raises if the stored data is not 256 levels of 3 bytes.
    return np.frombuffer(bytes.fromhex(RGB_HEX[name]), dtype=np.uint8).reshape(_M + 1, 3)


@cache
def _build(name: str, fade_low_activation: bool) -> npt.NDArray[np.uint8]:
    alpha = [_fade_alpha(i) if fade_low_activation else _M for i in range(_M + 1)]
    table = np.empty((_M + 1, 4), dtype=np.uint8)
    table[:, :3] = _rgb(name)
    table[:, 3] = alpha
    # Shared by every caller through the cache: a stray write would corrupt every later map.
    table.flags.writeable = False
    return table
