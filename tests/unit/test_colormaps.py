"""worker.colormaps: Jet against DESIGN.md and Kolena itself; the others against matplotlib."""

from __future__ import annotations

import importlib.util
import io
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from producer.errors import InvalidMapError
from worker.colormap_data import matplotlib_rgb
from worker.colormaps import COLORMAP_NAMES, lut
from worker.render import colorize, render_png

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("jet", "viridis", "inferno", "magma", "plasma", "turbo", "gray")
MATPLOTLIB_NAMES = NAMES[1:]
NO_MATPLOTLIB = "matplotlib is not installed (not a test extra): the comparison with matplotlib is skipped"

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


def test_the_colormaps_are_jet_first_then_matplotlibs() -> None:
    assert COLORMAP_NAMES == NAMES


@pytest.mark.parametrize("name", ["Viridis", "JET", "grey", "jet_r", "cividis", "hot", "", None, ["jet"]])
def test_unknown_colormaps_are_refused_listing_all_the_valid_names(name: object) -> None:
    expected = f"unknown colormap {name!r}; expected one of jet, viridis, inferno, magma, plasma, turbo, gray"
    with pytest.raises(InvalidMapError, match=f"^{re.escape(expected)}$"):
        lut(name, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("fade", [1, "yes", None])
def test_a_fade_flag_that_is_not_a_bool_is_refused(fade: object) -> None:
    with pytest.raises(InvalidMapError, match="expected a bool"):
        lut("jet", fade)  # type: ignore[arg-type]


# --- every colormap ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_table_is_read_only_256_by_4_uint8_and_cached(name: str) -> None:
    for fade in (True, False):
        table = lut(name, fade)
        assert table.shape == (256, 4)
        assert table.dtype == np.uint8
        assert table.flags.c_contiguous
        assert not table.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            table[0, 0] = 1
        assert lut(name, fade) is table
        assert lut(name, np.bool_(fade)) is table  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_alpha_is_kolenas_fade_curve_with_fade_and_opaque_without(name: str) -> None:
    fade_curve = [math.trunc(255 / (1 + math.exp((127.5 - i) / 8))) for i in range(256)]
    assert lut(name, True)[:, 3].tolist() == fade_curve
    assert (lut(name, False)[:, 3] == 255).all()
    np.testing.assert_array_equal(lut(name, True)[:, :3], lut(name, False)[:, :3])


# Spot values of matplotlib's cmap(i, bytes=True), checked without matplotlib. They truncate
# 255 * x, so plasma's level 0 is (12, 7, 134) where matplotlib's hex, which rounds, says #0d0887.
SPOT_VALUES = {
    "viridis": {0: (68, 1, 84), 128: (32, 144, 140), 255: (253, 231, 36)},
    "inferno": {0: (0, 0, 3), 128: (187, 55, 84), 255: (252, 254, 164)},
    "magma": {0: (0, 0, 3), 128: (182, 54, 121), 255: (251, 252, 191)},
    "plasma": {0: (12, 7, 134), 128: (203, 71, 119), 255: (239, 248, 33)},
    "turbo": {0: (48, 18, 59), 128: (164, 252, 59), 255: (122, 4, 2)},
    "gray": {0: (0, 0, 0), 33: (32, 32, 32), 128: (128, 128, 128), 255: (255, 255, 255)},
}


@pytest.mark.parametrize("name", MATPLOTLIB_NAMES)
def test_matplotlib_colormaps_have_their_known_rgb_at_a_few_levels(name: str) -> None:
    for level, rgb in SPOT_VALUES[name].items():
        assert tuple(lut(name, False)[level, :3].tolist()) == rgb, level


@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("name", MATPLOTLIB_NAMES)
def test_matplotlib_colormaps_equal_matplotlibs_bytes_output(name: str, fade: bool) -> None:
    matplotlib = pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    cmap = matplotlib.colormaps[name]
    assert cmap.N == 256
    expected = np.asarray(cmap(np.arange(256), bytes=True))
    np.testing.assert_array_equal(lut(name, fade)[:, :3], expected[:, :3])
    if not fade:
        np.testing.assert_array_equal(lut(name, fade), expected)  # matplotlib's alpha is 255 too


def test_jet_is_kolenas_not_matplotlibs() -> None:
    matplotlib = pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    theirs = np.asarray(matplotlib.colormaps["jet"](np.arange(256), bytes=True))
    assert tuple(theirs[0].tolist()) == (0, 0, 127, 255)
    assert tuple(lut("jet", False)[0].tolist()) == (0, 0, 128, 255)


def _decode_png(png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "P"
        return np.asarray(image.convert("RGBA"))


@pytest.mark.parametrize("fade", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_render_png_with_each_colormap_decodes_to_the_table_lookup(name: str, fade: bool) -> None:
    every_level = np.arange(256, dtype=np.uint8).reshape(8, 32)
    ramp = np.linspace(0.0, 1.0, 7 * 9).reshape(7, 9)
    for activation_map, intensities in (
        (every_level, every_level),
        (ramp, np.rint(ramp * 255).astype(np.uint8)),
    ):
        expected = lut(name, fade)[intensities]
        np.testing.assert_array_equal(_decode_png(render_png(activation_map, name, fade)), expected)
        np.testing.assert_array_equal(colorize(activation_map, name, fade), expected)


def test_the_worker_never_imports_matplotlib() -> None:
    code = (
        "import sys, worker.render, worker.colormaps as c; "
        "[c.lut(n, f) for n in c.COLORMAP_NAMES for f in (True, False)]; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# --- the stored data and its generator --------------------------------------------------------


def _generator() -> ModuleType:
    path = ROOT / "scripts" / "generate_colormaps.py"
    spec = importlib.util.spec_from_file_location("generate_colormaps", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stored_text() -> str:
    return Path(matplotlib_rgb.__file__).read_text(encoding="utf-8")


def test_the_generator_writes_the_module_the_worker_reads_with_the_worker_s_names() -> None:
    generator = _generator()
    assert Path(matplotlib_rgb.__file__).resolve() == generator.OUTPUT
    assert (*generator.NAMES,) == MATPLOTLIB_NAMES == tuple(matplotlib_rgb.RGB_HEX)


def test_the_stored_module_is_exactly_in_the_generator_s_format() -> None:
    """Without matplotlib: the stored tables, written out again, give the stored text (no hand edits)."""
    tables: dict[str, Any] = {name: lut(name, False)[:, :3] for name in MATPLOTLIB_NAMES}
    assert _generator().module_source(tables, matplotlib_rgb.MATPLOTLIB_VERSION) == _stored_text()


def test_the_stored_module_is_what_the_generator_writes_from_the_installed_matplotlib() -> None:
    pytest.importorskip("matplotlib", reason=NO_MATPLOTLIB)
    generator = _generator()
    tables = {name: generator.matplotlib_rgb(name) for name in generator.NAMES}
    # The version line names the matplotlib that generated the file; only the tables must agree.
    assert generator.module_source(tables, matplotlib_rgb.MATPLOTLIB_VERSION) == _stored_text()
