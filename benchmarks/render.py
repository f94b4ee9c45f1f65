"""How fast is render_png? ``python -m benchmarks.render`` prints the tables (about a minute).

Per map, on the same Grad-CAM-like float32 maps at 224², 512² and 1024²:

(a) the reference: Kolena's ``colorize_activation_map`` + ``encode_png`` (what Kolena's tutorial
    runs inside the inference loop). About 2 s per 224² map and linear in pixels, so it runs ONCE
    per size, and only at the sizes given by ``--reference`` (default 224,512: 1024² alone would
    take ~40 s);
(b) what a careful user would write by hand: a 256-entry RGBA LUT (Kolena's colours), ``lut[map]``
    to an RGBA array, Pillow's default PNG save of that RGBA image;
(c) actmap's ``worker.render.render_png`` on the float32 map, and on the uint8 map the worker gets
    (the producer quantizes before sending);
floor: zlib.compress alone on the very bytes actmap deflates (the PNG's filtered scanlines, read
    back from its IDAT), at the same level.

The level is the one actmap uses (``ACTMAP_PNG_COMPRESS_LEVEL``, else the setting's default), or
``--level``. A second table gives, at 224², ms and bytes of every zlib level 1-9, for actmap's
encoder and for the encoder it replaced (Pillow's palette PNG, which never filters).

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
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from PIL import Image

from benchmarks.common import gradcam_maps, machine, median_ms_per_item, png_idat, table
from producer.intensity import to_intensities
from producer.settings import Settings
from worker.render import colorize, render_png

# (maps per round, rounds) per size: enough for stable medians, a few seconds per size.
_PLAN = {224: (8, 41), 512: (8, 11), 1024: (4, 7)}
TARGETS_AT = 224


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
    """The encoder render_png used before: Pillow's palette PNG (filter type 0 on every row)."""
    height, width = intensities.shape
    image = Image.frombuffer("P", (width, height), intensities, "raw", "P", 0, 1)
    image.putpalette(table.tobytes(), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def decoded_rgba(png: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGBA"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="224,512,1024", help="map sizes (square), comma-separated")
    parser.add_argument(
        "--reference", default="224,512", help="sizes at which Kolena's reference runs (once); '' for none"
    )
    parser.add_argument("--level", type=int, default=None, help="zlib level (default: actmap's setting)")
    parser.add_argument("--no-levels", action="store_true", help="skip the table of levels 1-9")
    parser.add_argument("--repeats", type=float, default=1.0, help="scale the number of timing rounds")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    reference_sizes = {int(s) for s in args.reference.split(",") if s}
    level = Settings().png_compress_level if args.level is None else args.level
    started = time.perf_counter()

    print(f"machine: {machine()}")
    print(f"render_png: zlib level {level} ({'--level' if args.level is not None else 'actmap setting'})\n")
    jet = _handrolled_lut()
    rows, summary = [], {}
    for size in sizes:
        count, rounds = _PLAN.get(size, (4, 7))
        rounds = max(3, round(rounds * args.repeats))
        maps = gradcam_maps(size, count)
        intensities = [to_intensities(m) for m in maps]
        pngs_b = [handrolled_png(m, jet) for m in maps]
        pngs_c = [render_png(m, compress_level=level) for m in maps]
        scanlines = [zlib.decompress(png_idat(png)) for png in pngs_c]
        # Same picture from (b) and (c), and equal to colorize(): the comparison is apples to apples.
        for m, png_b, png_c in zip(maps, pngs_b, pngs_c, strict=True):
            expected = colorize(m)
            assert np.array_equal(decoded_rgba(png_c), expected), "render_png does not decode to colorize()"
            assert np.array_equal(decoded_rgba(png_b), expected), "hand-rolled PNG differs from colorize()"
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
                "floor": lambda lines=scanlines: [zlib.compress(s, level) for s in lines],
            },
            count,
            rounds,
        )
        b_bytes = statistics.median(len(p) for p in pngs_b)
        c_bytes = statistics.median(len(p) for p in pngs_c)
        row = {
            "size": f"{size}²",
            "a_ms": a_ms,
            "b_ms": times["b"],
            "c_ms": times["c"],
            "c_u8_ms": times["c_u8"],
            "floor_ms": times["floor"],
            "a/c": a_ms / times["c"] if a_ms else None,
            "b/c": times["b"] / times["c"],
            "c/floor": times["c"] / times["floor"],
            "c_u8/floor": times["c_u8"] / times["floor"],
            "a_bytes": a_bytes,
            "b_bytes": b_bytes,
            "c_bytes": c_bytes,
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
                "-" if a_ms is None else f"{row['a/c']:,.0f}x",
                f"{row['b/c']:.1f}x",
                f"{row['c/floor']:.2f}",
                f"{row['c_u8/floor']:.2f}",
                "-" if a_bytes is None else int(a_bytes),
                int(b_bytes),
                int(c_bytes),
            ]
        )
        print(f"  {size}²: {count} maps x {rounds} rounds", file=sys.stderr)

    print(f"ms per map (medians; a: one call) and PNG bytes (medians), zlib level {level}")
    print(
        table(
            [
                "size",
                "(a) kolena ms",
                "(b) LUT+RGBA ms",
                "(c) actmap ms",
                "(c) uint8 in",
                "floor ms",
                "a/c",
                "b/c",
                "c/floor",
                "c(u8)/floor",
                "(a) bytes",
                "(b) bytes",
                "(c) bytes",
            ],
            rows,
        )
    )
    print(
        "(c) takes the float32 map like (a) and (b); '(c) uint8 in' takes the quantized map a worker "
        "receives.\nfloor = zlib.compress of the PNG's filtered scanlines (filter byte + row) "
        "at the same level."
    )
    if TARGETS_AT in summary:
        _print_targets(summary[TARGETS_AT])

    if not args.no_levels and TARGETS_AT in sizes:
        _print_levels(TARGETS_AT, jet, args.repeats)
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


def _print_levels(size: int, jet: npt.NDArray[np.uint8], repeats: float) -> None:
    from worker.colormaps import lut

    count, rounds = _PLAN[size]
    rounds = max(3, round(rounds * repeats))
    maps = [to_intensities(m) for m in gradcam_maps(size, count)]
    palette = lut("jet", True)
    b_bytes = statistics.median(len(handrolled_png(m, jet)) for m in gradcam_maps(size, count))
    rows = []
    for level in range(1, 10):
        new = [render_png(m, compress_level=level) for m in maps]
        old = [pillow_palette_png(m, palette, level) for m in maps]
        new_lines = [zlib.decompress(png_idat(p)) for p in new]
        old_lines = [zlib.decompress(png_idat(p)) for p in old]
        times = median_ms_per_item(
            {
                "new": lambda maps=maps, level=level: [render_png(m, compress_level=level) for m in maps],
                "new_floor": lambda lines=new_lines, level=level: [zlib.compress(s, level) for s in lines],
                "old": lambda maps=maps, level=level: [pillow_palette_png(m, palette, level) for m in maps],
                "old_floor": lambda lines=old_lines, level=level: [zlib.compress(s, level) for s in lines],
            },
            count,
            rounds,
        )
        rows.append(
            [
                level,
                times["new"],
                int(statistics.median(len(p) for p in new)),
                times["new_floor"],
                f"{times['new'] / times['new_floor']:.2f}",
                times["old"],
                int(statistics.median(len(p) for p in old)),
                times["old_floor"],
            ]
        )
    print(f"\nzlib levels at {size}² (uint8 maps as the worker gets them; ms per map, medians; PNG bytes)")
    print(
        table(
            [
                "level",
                "actmap ms",
                "actmap bytes",
                "floor ms",
                "actmap/floor",
                "old Pillow-P ms",
                "old bytes",
                "old floor ms",
            ],
            rows,
        )
    )
    print(
        f"actmap = render_png (Sub filter on every row, written with zlib); old = Pillow's palette PNG "
        f"(no filter), the encoder render_png used before.\n(b) at level 6 with adaptive filters: "
        f"{b_bytes:,.0f} B."
    )


if __name__ == "__main__":
    raise SystemExit(main())
