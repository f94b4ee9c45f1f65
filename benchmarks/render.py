"""How fast is render_png? ``python -m benchmarks.render`` prints the tables (about a minute).

Per map, on the same Grad-CAM-like float32 maps at 224², 512² and 1024²:

(a) the reference: Kolena's ``colorize_activation_map`` + ``encode_png`` (what Kolena's tutorial
    runs inside the inference loop). About 2 s per 224² map and linear in pixels, so it runs ONCE
    per size, and only at the sizes given by ``--reference`` (default 224,512: 1024² alone would
    take ~40 s);
(b) what a careful user would write by hand: a 256-entry RGBA LUT (Kolena's colours), ``lut[map]``
    to an RGBA array, Pillow's default PNG save of that RGBA image;
(c) actmap's ``worker.render.render_png`` (Sub filter, ISA-L deflate) on the float32 map, and on
    the uint8 map the producer quantizes it to (the producer's Sub filter and deflate and the
    worker's ``png_from_scanlines`` between them make this same PNG);
floor: the deflate alone, with the same library and level (``isal_zlib.compress`` at the PNG level),
    on the very bytes actmap deflates (the PNG's filtered scanlines, read back from its IDAT);
zlib 1: for comparison, the same PNG with its IDAT deflated by zlib at level 1, whole from uint8,
    and that deflate alone.

The level is the one actmap uses (``ACTMAP_PNG_COMPRESS_LEVEL``, else the setting's default), or
``--level``: an ISA-L level, 0-3. A second table gives, at 224² and 512², ms and bytes of every
ISA-L level 0-3 against zlib's levels 1 and 6 and Pillow's palette PNG (which never filters) at 1.

Timings are medians over repeats; the variants are interleaved within each repeat, so the ratios
of one run are measured under the same noise.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
from isal import isal_zlib
from PIL import Image

from benchmarks.common import gradcam_maps, machine, median_ms_per_item, png_idat, table
from producer.intensity import to_intensities
from producer.settings import Settings
from producer.wire import Scanlines, sub_filtered
from worker import render
from worker.render import colorize, render_png

# (maps per round, rounds) per size: enough for stable medians, a few seconds per size.
_PLAN = {224: (8, 41), 512: (8, 11), 1024: (4, 7)}
TARGETS_AT = 224
LEVELS_AT = (224, 512)


def kolena_reference_png(activation_map: npt.NDArray[np.float32]) -> bytes:
    """(a) Kolena's functions, as its tutorial calls them."""
    from kolena.workflow.visualization import colorize_activation_map, encode_png

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow deprecates fromarray's mode argument that Kolena passes
        return encode_png(colorize_activation_map(activation_map), "RGBA").getvalue()


def kolena_encode_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    from kolena.workflow.visualization import encode_png

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return encode_png(rgba, "RGBA").getvalue()


def _handrolled_lut() -> npt.NDArray[np.uint8]:
    from kolena.workflow.visualization import ColormapJet

    jet = ColormapJet()
    return np.stack([jet.colorize(np.uint8(i)) for i in range(256)])


def handrolled_png(activation_map: npt.NDArray[np.float32], table: npt.NDArray[np.uint8]) -> bytes:
    """(b) a 256-entry RGBA LUT, lut[map] to an RGBA array, Pillow's default PNG save of it."""
    rgba = table[np.rint(activation_map * np.float32(255)).astype(np.uint8)]
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return buffer.getvalue()


def pillow_palette_png(intensities: npt.NDArray[np.uint8], table: npt.NDArray[np.uint8], level: int) -> bytes:
    """Pillow's palette PNG of the uint8 map (filter type 0 on every row: Pillow never filters them)."""
    height, width = intensities.shape
    image = Image.frombuffer("P", (width, height), intensities, "raw", "P", 0, 1)
    image.putpalette(table.tobytes(), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def zlib_render_png(activation_map: npt.NDArray[np.generic], level: int = 1) -> bytes:
    """render_png's PNG, the same chunks and Sub filter, with its IDAT deflated by zlib at ``level``."""
    rows = sub_filtered(to_intensities(activation_map))
    return render._png(Scanlines(rows, zlib.compress(rows.data, level)), render._palette_chunks("jet", True))


def decoded_rgba(png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGBA"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="224,512,1024", help="map sizes (square), comma-separated")
    parser.add_argument(
        "--reference", default="224,512", help="sizes at which Kolena's reference runs (once); '' for none"
    )
    parser.add_argument("--level", type=int, default=None, help="ISA-L level 0-3 (default: actmap's setting)")
    parser.add_argument("--no-levels", action="store_true", help="skip the table of levels")
    parser.add_argument("--repeats", type=float, default=1.0, help="scale the number of timing rounds")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    reference_sizes = {int(s) for s in args.reference.split(",") if s}
    level = Settings().png_compress_level if args.level is None else args.level
    started = time.perf_counter()

    print(f"machine: {machine()}")
    print(f"render_png: ISA-L level {level} ({'--level' if args.level is not None else 'actmap setting'})\n")
    jet = _handrolled_lut()
    rows, summary = [], {}
    for size in sizes:
        count, rounds = _PLAN.get(size, (4, 7))
        rounds = max(3, round(rounds * args.repeats))
        maps = gradcam_maps(size, count)
        intensities = [to_intensities(m) for m in maps]
        pngs_b = [handrolled_png(m, jet) for m in maps]
        pngs_c = [render_png(m, compress_level=level) for m in maps]
        pngs_z = [zlib_render_png(i) for i in intensities]
        scanlines = [zlib.decompress(png_idat(png)) for png in pngs_c]
        assert scanlines == [zlib.decompress(png_idat(png)) for png in pngs_z], "not the same scanlines"
        # Same picture from (b), (c) and zlib 1, equal to colorize(): the comparison is apples to apples.
        for m, png_b, png_c, png_z in zip(maps, pngs_b, pngs_c, pngs_z, strict=True):
            expected = colorize(m)
            assert np.array_equal(decoded_rgba(png_c), expected), "render_png does not decode to colorize()"
            assert np.array_equal(decoded_rgba(png_b), expected), "hand-rolled PNG differs from colorize()"
            assert np.array_equal(decoded_rgba(png_z), expected), "zlib render differs from colorize()"
        a_ms = a_bytes = None
        if size in reference_sizes:
            t0 = time.perf_counter()
            png_a = kolena_reference_png(maps[0])
            a_ms = (time.perf_counter() - t0) * 1e3
            assert np.array_equal(decoded_rgba(png_a), decoded_rgba(pngs_c[0])), "(a) and (c) differ"
            # Timed on one map; its bytes are Kolena's encode_png of the RGBA, which colorize()
            # reproduces bit-exactly (asserted above), so they are taken over every map alike.
            a_bytes = statistics.median(len(kolena_encode_png(colorize(m))) for m in maps)
        times = median_ms_per_item(
            {
                "b": lambda maps=maps: [handrolled_png(m, jet) for m in maps],
                "c": lambda maps=maps: [render_png(m, compress_level=level) for m in maps],
                "c_u8": lambda ints=intensities: [render_png(i, compress_level=level) for i in ints],
                "floor": lambda lines=scanlines: [isal_zlib.compress(s, level) for s in lines],
                "z_u8": lambda ints=intensities: [zlib_render_png(i) for i in ints],
                "z_floor": lambda lines=scanlines: [zlib.compress(s, 1) for s in lines],
            },
            count,
            rounds,
        )
        b_bytes = statistics.median(len(p) for p in pngs_b)
        c_bytes = statistics.median(len(p) for p in pngs_c)
        z_bytes = statistics.median(len(p) for p in pngs_z)
        row = {
            "size": f"{size}²",
            "a_ms": a_ms,
            "b_ms": times["b"],
            "c_ms": times["c"],
            "c_u8_ms": times["c_u8"],
            "floor_ms": times["floor"],
            "z_u8_ms": times["z_u8"],
            "z_floor_ms": times["z_floor"],
            "a/c": a_ms / times["c"] if a_ms else None,
            "b/c": times["b"] / times["c"],
            "c/floor": times["c"] / times["floor"],
            "c_u8/floor": times["c_u8"] / times["floor"],
            "a_bytes": a_bytes,
            "b_bytes": b_bytes,
            "c_bytes": c_bytes,
            "z_bytes": z_bytes,
        }
        summary[size] = row
        rows.append(
            [
                row["size"],
                "skipped" if a_ms is None else f"{a_ms:,.0f} (n=1)",
                times["b"],
                times["c"],
                times["c_u8"],
                times["floor"],
                times["z_u8"],
                times["z_floor"],
                "-" if a_ms is None else f"{row['a/c']:,.0f}x",
                f"{row['b/c']:.1f}x",
                f"{row['c/floor']:.2f}",
                f"{row['c_u8/floor']:.2f}",
                f"{times['z_u8'] / times['c_u8']:.2f}x",
                "-" if a_bytes is None else int(a_bytes),
                int(b_bytes),
                int(c_bytes),
                int(z_bytes),
            ]
        )
        print(f"  {size}²: {count} maps x {rounds} rounds", file=sys.stderr)

    print(f"ms per map (medians; a: one call) and PNG bytes (medians), ISA-L level {level}")
    print(
        table(
            [
                "size",
                "(a) kolena ms",
                "(b) LUT+RGBA ms",
                "(c) actmap ms",
                "(c) uint8 in",
                "floor ms",
                "zlib-1 u8 ms",
                "zlib-1 floor",
                "a/c",
                "b/c",
                "c/floor",
                "c(u8)/floor",
                "zlib-1/c(u8)",
                "(a) bytes",
                "(b) bytes",
                "(c) bytes",
                "zlib-1 bytes",
            ],
            rows,
        )
    )
    print(
        "(c) takes the float32 map like (a) and (b); '(c) uint8 in' takes the map as the producer "
        "quantizes it.\nfloor = isal_zlib.compress of the PNG's filtered scanlines (filter byte + row) "
        f"at the same level ({level}).\nzlib-1 = the same PNG with its IDAT deflated by zlib level 1, "
        "from uint8; its floor is zlib.compress(scanlines, 1)."
    )
    if TARGETS_AT in summary:
        _print_targets(summary[TARGETS_AT])

    if not args.no_levels:
        for size in (s for s in LEVELS_AT if s in sizes):
            _print_levels(size, jet, args.repeats)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


def _print_targets(row: dict[str, object]) -> None:
    def check(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    a_c, b_c, c_floor = row["a/c"], row["b/c"], row["c/floor"]
    assert isinstance(b_c, float) and isinstance(c_floor, float)
    print(f"\ntargets at {TARGETS_AT}²:")
    if isinstance(a_c, float):
        print(f"  (c) >= 1000x faster than (a): {a_c:,.0f}x  {check(a_c >= 1000)}")
    print(f"  (c) >= 4x faster than (b):     {b_c:.1f}x  {check(b_c >= 4)}")
    c_u8_floor = row["c_u8/floor"]
    assert isinstance(c_u8_floor, float)
    print(
        f"  (c) within 1.3x of the floor:  {c_floor:.2f}x from float32, {c_u8_floor:.2f}x from uint8  "
        f"{check(c_floor <= 1.3)} / {check(c_u8_floor <= 1.3)}"
    )
    b_bytes, c_bytes = row["b_bytes"], row["c_bytes"]
    assert isinstance(b_bytes, float) and isinstance(c_bytes, float)
    print(f"  PNG no larger than (b)'s:      {c_bytes:,.0f} vs {b_bytes:,.0f} B  {check(c_bytes <= b_bytes)}")
    z_ms, c_u8_ms, z_bytes = row["z_u8_ms"], row["c_u8_ms"], row["z_bytes"]
    assert isinstance(z_ms, float) and isinstance(c_u8_ms, float) and isinstance(z_bytes, float)
    print(
        f"  against zlib level 1, from uint8: {z_ms / c_u8_ms:.2f}x faster, "
        f"{c_bytes:,.0f} vs {z_bytes:,.0f} B ({c_bytes / z_bytes - 1:+.1%})"
    )


def _print_levels(size: int, jet: npt.NDArray[np.uint8], repeats: float) -> None:
    """ISA-L levels 0-3 of render_png against the same PNG deflated by zlib, and Pillow's palette PNG."""
    from worker.colormaps import lut

    count, rounds = _PLAN[size]
    rounds = max(3, round(rounds * repeats))
    maps = [to_intensities(m) for m in gradcam_maps(size, count)]
    palette = lut("jet", True)
    b_bytes = statistics.median(len(handrolled_png(m, jet)) for m in gradcam_maps(size, count))
    scanlines = [zlib.decompress(png_idat(render_png(m))) for m in maps]
    variants: dict[str, tuple[Callable[[npt.NDArray[np.uint8]], bytes], Callable[[bytes], bytes]]] = {}
    for level in range(4):
        variants[f"actmap, ISA-L {level}"] = (
            lambda m, level=level: render_png(m, compress_level=level),
            lambda s, level=level: isal_zlib.compress(s, level),
        )
    for level in (1, 6):
        variants[f"same PNG, zlib {level}"] = (
            lambda m, level=level: zlib_render_png(m, level),
            lambda s, level=level: zlib.compress(s, level),
        )
    calls: dict[str, Callable[[], object]] = {}
    for name, (encode, deflate) in variants.items():
        calls[name] = lambda encode=encode: [encode(m) for m in maps]
        calls[f"{name} floor"] = lambda deflate=deflate: [deflate(s) for s in scanlines]
    calls["Pillow-P, zlib 1"] = lambda: [pillow_palette_png(m, palette, 1) for m in maps]
    times = median_ms_per_item(calls, count, rounds)
    reference = times["same PNG, zlib 1"]
    rows = []
    for name, (encode, _) in variants.items():
        pngs = [encode(m) for m in maps]
        assert all(np.array_equal(decoded_rgba(p), colorize(m)) for p, m in zip(pngs, maps, strict=True))
        rows.append(
            [
                name,
                times[name],
                int(statistics.median(len(p) for p in pngs)),
                times[f"{name} floor"],
                f"{times[name] / times[f'{name} floor']:.2f}",
                f"{reference / times[name]:.2f}x",
            ]
        )
    pillow_bytes = int(statistics.median(len(pillow_palette_png(m, palette, 1)) for m in maps))
    pillow_ms = times["Pillow-P, zlib 1"]
    rows.append(["Pillow-P, zlib 1", pillow_ms, pillow_bytes, "-", "-", f"{reference / pillow_ms:.2f}x"])
    print(
        f"\nlevels at {size}² (uint8 maps, as the producer quantizes them; ms per map and PNG bytes, medians)"
    )
    print(table(["encoder", "ms", "PNG bytes", "deflate alone ms", "ms/deflate", "speed vs zlib 1"], rows))
    print(
        "actmap = render_png (Sub filter on every row, deflated by ISA-L); same PNG, zlib = its IDAT "
        "deflated by zlib;\nPillow-P = Pillow's palette PNG (no filter). "
        f"(b) at level 6 with adaptive filters: {b_bytes:,.0f} B."
    )


if __name__ == "__main__":
    raise SystemExit(main())
