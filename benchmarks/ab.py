"""Two commits against each other in one run: ``python -m benchmarks.ab OLD NEW`` (about 15 minutes).

Each commit is checked out in a git worktree and runs its own ``benchmarks.end_to_end`` (local
folder and S3, 1 and 2 worker processes) and ``benchmarks.producer``, alternated OLD NEW NEW OLD
so that a drift of this noisy machine falls on both. Printed: each run's maps/s and worker CPU
per map, the producer's submit p50/p99 and broker bytes per map, and NEW/OLD as the ratio of
the means. Both use this interpreter and its installed packages.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PROGRESS = re.compile(r"^\s+(?P<config>.+): (?P<rate>\d+) maps/s, worker CPU (?P<cpu>[\d.]+) ms/map$")
_PRODUCER_ROWS = ("submit, publisher thread @ 200/s", "broker bytes per map (submit, publisher thread")


def worktree(revision: str, into: Path) -> Path:
    path = into / revision
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), revision], check=True)
    return path


def run(tree: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} in {tree} failed:\n{done.stderr[-3000:]}")
    return done


def end_to_end(tree: Path, maps: int, storage: str) -> dict[str, tuple[float, float]]:
    """maps/s and worker CPU ms/map per configuration, from the benchmark's progress lines."""
    done = run(tree, "benchmarks.end_to_end", "--storage", storage, "--processes", "1,2",
               "--maps", str(maps), "--no-batch-1", "--no-memory")  # fmt: skip
    figures = {}
    for line in done.stderr.splitlines():
        if match := _PROGRESS.match(line):
            figures[match["config"]] = (float(match["rate"]), float(match["cpu"]))
    return figures


def producer(tree: Path, maps: int) -> dict[str, list[str]]:
    """The producer benchmark's rows for the publisher thread: label -> its cells."""
    done = run(tree, "benchmarks.producer", "--maps", str(maps))
    rows = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(_PRODUCER_ROWS):
            rows[cells[0]] = cells[1:]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--maps", type=int, default=2000, help="maps per end-to-end configuration")
    parser.add_argument("--producer-maps", type=int, default=2000, help="maps per paced producer run")
    parser.add_argument("--storage", default="local,s3", help="end-to-end storages (default local,s3)")
    parser.add_argument("--rounds", type=int, default=1, help="times to run old new new old (default 1)")
    parser.add_argument("--no-producer", action="store_true", help="skip the producer benchmark")
    args = parser.parse_args()
    e2e: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    rows: dict[str, dict[str, list[list[str]]]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory(prefix="actmap-ab-") as tmp:
        trees = {
            name: worktree(revision, Path(tmp)) for name, revision in (("old", args.old), ("new", args.new))
        }
        try:
            for name in ("old", "new", "new", "old") * args.rounds:
                print(f"== {name} ({getattr(args, name)})", file=sys.stderr, flush=True)
                for config, figures in end_to_end(trees[name], args.maps, args.storage).items():
                    e2e[config][name].append(figures)
                    print(f"  {config}: {figures[0]:.0f} maps/s, {figures[1]:.2f} ms/map", file=sys.stderr)
                if not args.no_producer:
                    for label, cells in producer(trees[name], args.producer_maps).items():
                        rows[label][name].append(cells)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
                )
    print(f"\nA/B, alternated old new new old x{args.rounds}: old {args.old}, new {args.new}\n")
    print("| configuration | maps/s old | maps/s new | new/old | worker CPU ms/map old | new | new/old |")
    print("|---|---|---|---|---|---|---|")
    for config, runs in e2e.items():
        old, new = runs["old"], runs["new"]
        rate = [statistics.mean(r for r, _ in side) for side in (old, new)]
        cpu = [statistics.mean(c for _, c in side) for side in (old, new)]
        rates = [" / ".join(f"{r:.0f}" for r, _ in side) for side in (old, new)]
        cpus = [" / ".join(f"{c:.2f}" for _, c in side) for side in (old, new)]
        print(
            f"| {config} | {rates[0]} | {rates[1]} | {rate[1] / rate[0]:.2f} "
            f"| {cpus[0]} | {cpus[1]} | {cpu[1] / cpu[0]:.2f} |"
        )
    if not rows:
        return 0
    print("\n| producer row | old | new |")
    print("|---|---|---|")
    for label, runs in rows.items():
        old_cells, new_cells = (
            " ; ".join(" ".join(cells) for cells in runs[side]) for side in ("old", "new")
        )
        print(f"| {label} | {old_cells} | {new_cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
