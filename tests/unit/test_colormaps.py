"""worker.colormaps: the Jet table against DESIGN.md's published values and against Kolena itself."""

from __future__ import annotations

import numpy as np
import pytest

from producer.errors import InvalidMapError
from worker.colormaps import COLORMAP_NAMES, lut
from worker.render import colorize

# DESIGN.md, "Colorize": intensity -> RGBA with fade on, and with fade off.
PUBLISHED = {
    0: ((0, 0, 128, 0), (0, 0, 128, 255)),
    32: ((0, 0, 255, 0), (0, 0, 255, 255)),
    95: ((0, 252, 255, 4), (0, 252, 255, 255)),
    128: ((130, 255, 126, 131), (130, 255, 126, 255)),
    160: ((255, 252, 0, 250), (255, 252, 0, 255)),
    223: ((255, 0, 0, 254), (255, 0, 0, 255)),
    255: ((128, 0, 0, 254), (128, 0, 0, 255)),
}


@pytest.mark.parametrize("intensity", sorted(PUBLISHED))
def test_jet_matches_the_published_check_values_with_fade_on_and_off(intensity: int) -> None:
    fade_on, fade_off = PUBLISHED[intensity]
    assert tuple(lut("jet", True)[intensity].tolist()) == fade_on
    assert tuple(lut("jet", False)[intensity].tolist()) == fade_off


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_published_float_map_gives_the_rows_of_160_223_and_255(dtype: type) -> None:
    rgba = colorize(np.array([[0.627, 0.875, 1.0]], dtype=dtype))
    assert rgba.shape == (1, 3, 4)
    assert [tuple(pixel) for pixel in rgba[0].tolist()] == [PUBLISHED[i][0] for i in (160, 223, 255)]


@pytest.mark.parametrize("fade", [True, False])
def test_all_256_jet_entries_equal_kolenas_colormap_jet(fade: bool) -> None:
    visualization = pytest.importorskip("kolena.workflow.visualization")
    colormap = visualization.ColormapJet(fade_low_activation=fade)
    expected = np.array([colormap.colorize(np.uint8(i)) for i in range(256)], dtype=np.uint8)
    np.testing.assert_array_equal(lut("jet", fade), expected)


def test_without_fade_every_entry_is_opaque_and_with_fade_alpha_never_decreases() -> None:
    assert (lut("jet", False)[:, 3] == 255).all()
    assert (np.diff(lut("jet", True)[:, 3].astype(int)) >= 0).all()


def test_tables_are_read_only_256_by_4_uint8_and_cached() -> None:
    table = lut("jet", True)
    assert table.shape == (256, 4)
    assert table.dtype == np.uint8
    assert table.flags.c_contiguous
    assert not table.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        table[0, 0] = 1
    assert lut("jet", True) is table
    assert lut("jet", np.bool_(True)) is table  # type: ignore[arg-type]
    assert lut("jet", False) is not table


def test_jet_is_the_only_colormap_name_for_now() -> None:
    assert COLORMAP_NAMES == ("jet",)


@pytest.mark.parametrize("name", ["viridis", "Jet", "", None, ["jet"]])
def test_unknown_colormaps_are_refused_listing_the_valid_names(name: object) -> None:
    with pytest.raises(InvalidMapError, match=r"unknown colormap .*; expected one of jet"):
        lut(name, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("fade", [1, "yes", None])
def test_a_fade_flag_that_is_not_a_bool_is_refused(fade: object) -> None:
    with pytest.raises(InvalidMapError, match="expected a bool"):
        lut("jet", fade)  # type: ignore[arg-type]
