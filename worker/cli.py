"""``actmap``: run a worker, submit map files, collect results, or try it all with ``demo``.

Global options mirror the ``ACTMAP_*`` environment variables and are handed to the one
Settings object through the environment, so a worker's pool processes see them too.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from producer.errors import ActmapError, CollectTimeoutError, PermanentError

if TYPE_CHECKING:
    from producer.client import PendingMap, Producer

_GLOBAL_OPTIONS = {
    "home": "ACTMAP_HOME",
    "broker_url": "ACTMAP_BROKER_URL",
    "result_backend": "ACTMAP_RESULT_BACKEND",
    "storage_url": "ACTMAP_STORAGE_URL",
    "s3_endpoint_url": "ACTMAP_S3_ENDPOINT_URL",
    "queue": "ACTMAP_QUEUE",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--home", envvar="ACTMAP_HOME", show_envvar=True, help="Folder of the embedded default.")
@click.option("--broker-url", envvar="ACTMAP_BROKER_URL", show_envvar=True, help="Celery broker URL.")
@click.option(
    "--result-backend", envvar="ACTMAP_RESULT_BACKEND", show_envvar=True, help="Result backend URL."
)
@click.option(
    "--storage-url", envvar="ACTMAP_STORAGE_URL", show_envvar=True, help="s3://bucket/prefix or file:///dir."
)
@click.option(
    "--s3-endpoint-url", envvar="ACTMAP_S3_ENDPOINT_URL", show_envvar=True, help="S3-compatible endpoint."
)
@click.option("--queue", envvar="ACTMAP_QUEUE", show_envvar=True, help="Celery queue name.")
def cli(**options: str | None) -> None:
    """Colorize activation maps on Celery workers and store them as PNGs for Kolena."""
    for option, variable in _GLOBAL_OPTIONS.items():
        if options[option] is not None:
            os.environ[variable] = str(options[option])


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--metrics-port",
    type=int,
    envvar="ACTMAP_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics (summed over the pool processes) on this port.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(metrics_port: int | None, celery_args: tuple[str, ...]) -> None:
    """Start a worker. Any other flags go to `celery worker` (e.g. --concurrency 4 -n w1@%h)."""
    if metrics_port is not None:
        _serve_metrics(metrics_port)
    from worker.app import app, settings

    argv = ["worker", "--queues", settings.queue]
    if settings.uses_filesystem_broker():
        argv += ["--without-mingle", "--without-gossip"]
    if not any(arg.startswith(("-l", "--loglevel")) for arg in celery_args):
        argv += ["--loglevel", "INFO"]
    app.worker_main([*argv, *celery_args])


@cli.command("sweep-temporary-files")
@click.option(
    "--older-than", type=float, default=600.0, help="Seconds since a temporary file was last written."
)
def sweep_temporary_files(older_than: float) -> None:
    """Delete what writes cut short left in a local storage folder (a worker killed mid-write)."""
    from producer.settings import Settings
    from worker.storage import FileStorage, open_storage

    settings = Settings()
    storage = open_storage(settings).storage
    if not isinstance(storage, FileStorage):
        raise click.ClickException(
            f"storage {settings.effective_storage_url} is not a local folder: S3 writes leave no "
            "temporary files"
        )
    files, size = storage.sweep_temporary_files(older_than)
    click.echo(
        f"deleted {files} temporary file(s) ({size:,} bytes) older than {older_than:g} s under {storage.root}"
    )


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--run-id", help="Run id to submit under (default: a new one, printed).")
@click.option("--colormap", default="jet")
@click.option("--fade/--no-fade", "fade_low_activation", default=True, help="Fade low activations.")
@click.option("--strict", is_flag=True, help="Stop at the first file not read or refused.")
def submit(
    paths: tuple[Path, ...], run_id: str | None, colormap: str, fade_low_activation: bool, strict: bool
) -> None:
    """Submit .npy/.npz maps (files or folders); print one JSON line per map to collect later.

    The image id is the file's path relative to the folder given, without its suffix; an
    .npz with several arrays gives one map per array, named after it. A file that cannot be
    read, or whose map is refused, is reported on stderr and the others are submitted (with
    --strict, none after it); the exit code is then 1.
    """
    from producer.client import Producer

    try:
        with Producer(run_id=run_id) as producer:  # leaving it publishes what is buffered
            click.echo(f"run id: {producer.run_id}", err=True)
            handles, refused = _submit_files(producer, paths, colormap, fade_low_activation, strict)
    except ActmapError as exc:  # the broker, not a file: nothing is known to be sent
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    for handle in handles:
        click.echo(json.dumps({"run_id": handle.run_id, "image_id": handle.image_id, "name": handle.name}))
    if refused:
        stopped = "; --strict: stopped at it" if strict else ""
        click.echo(
            f"{refused} file(s) not read or refused, {len(handles)} map(s) submitted{stopped}", err=True
        )
        sys.exit(1)


@cli.command()
@click.argument("pending", type=click.File("r"), default="-")
@click.option("--run-id", help="Collect these image ids of this run instead of reading PENDING.")
@click.option(
    "--image-id", "image_ids", multiple=True, help="Image id to collect (with --run-id); repeatable."
)
@click.option("--timeout", type=float, default=300.0, help="Seconds to wait for the last result.")
def collect(pending: Any, run_id: str | None, image_ids: tuple[str, ...], timeout: float) -> None:
    """Print each map's result as a JSON line, reading what `actmap submit` printed (or --run-id)."""
    from producer.client import Producer

    if run_id:
        wanted: list[tuple[str, str | None]] = [(image_id, None) for image_id in image_ids]
    else:
        rows = [json.loads(line) for line in pending if line.strip()]
        run_ids = {row["run_id"] for row in rows}
        if len(run_ids) > 1:
            raise click.ClickException(f"PENDING mixes runs {sorted(run_ids)}; collect one run at a time")
        run_id = run_ids.pop() if run_ids else None
        wanted = [(row["image_id"], row.get("name")) for row in rows]
    if not wanted:
        raise click.ClickException("nothing to collect: give PENDING lines or --run-id with --image-id")
    with Producer(run_id=run_id) as producer:
        try:
            results = producer.collect(wanted, timeout=timeout, progress=True)
        except CollectTimeoutError as exc:
            results = exc.results
            click.echo(f"timeout: {exc}", err=True)
    for result in results:
        click.echo(json.dumps(result.to_dict()))
    failed = sum(not r.ok for r in results)
    if failed:
        click.echo(f"{failed} of {len(results)} maps failed", err=True)
        sys.exit(1)


@cli.command()
@click.option("--count", type=int, default=6, help="How many images and maps to make.")
@click.option("--size", type=int, default=224, help="Side of the maps and images, in pixels.")
def demo(count: int, size: int) -> None:
    """Make Grad-CAM-like maps, start a worker, submit, collect, and show where the PNGs are."""
    from worker.demo import run_demo

    try:
        run_demo(count=count, size=size, echo=click.echo)
    except ActmapError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


@cli.command()
@click.option(
    "--results",
    "results_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="What `actmap collect` printed (JSON lines).",
)
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of the images: <image id>.jpg/.jpeg/.png/.webp.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="gallery.html")
def gallery(results_path: Path, images: Path, out: Path) -> None:
    """Write a static HTML page of each image with its map over it (s3:// maps: presigned URLs)."""
    from worker.gallery import read_results, write_gallery

    try:
        results = read_results(results_path)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"cannot read {results_path}: {exc}") from exc
    click.echo(write_gallery(out, results, images))


def _serve_metrics(port: int) -> None:
    from producer.settings import Settings

    # prometheus_client picks its multiprocess mode when first imported: set its folder before
    # the app, its tasks or worker.metrics import it.
    folder = Settings().resolved_home / "metrics" / str(os.getpid())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    from worker import metrics

    metrics.serve(port)


def _map_files(paths: tuple[Path, ...]) -> Iterator[tuple[Path, str]]:
    """Each .npy/.npz file given or under a folder given, with its image id."""
    for root in paths:
        if not root.is_dir():
            yield root, Path(root.name).with_suffix("").as_posix()
            continue
        for file in sorted(p for p in root.rglob("*") if p.suffix in (".npy", ".npz")):
            yield file, file.relative_to(root).with_suffix("").as_posix()


def _submit_files(
    producer: Producer, paths: tuple[Path, ...], colormap: str, fade: bool, strict: bool
) -> tuple[list[PendingMap], int]:
    """The handles of every map sent, and how many files were not read or refused (each reported)."""
    from tqdm import tqdm

    handles: list[PendingMap] = []
    refused = 0
    with tqdm(desc="submit", unit="map", disable=None) as bar:  # no bar in a log file
        for file, image_id in _map_files(paths):
            sent, reason = _submit_file(producer, file, image_id, colormap, fade)
            handles += sent
            bar.update(len(sent))
            if reason is not None:
                refused += 1
                tqdm.write(f"{file}: {reason}", file=sys.stderr)
                if strict:
                    break
    return handles, refused


def _read_maps(file: Path, image_id: str) -> list[tuple[str, Any, str | None]]:
    """The file's maps as submit_many items: read whole, so a broken file sends none of them."""
    import numpy as np

    if file.suffix != ".npz":
        return [(image_id, np.load(file, allow_pickle=False), None)]
    with np.load(file, allow_pickle=False) as archive:
        names = list(archive.files)
        return [(image_id, archive[name], None if len(names) == 1 else name) for name in names]


def _submit_file(
    producer: Producer, file: Path, image_id: str, colormap: str, fade: bool
) -> tuple[list[PendingMap], str | None]:
    """The handles of the file's maps sent, and why the rest were not (None: all sent)."""
    try:
        items = _read_maps(file, image_id)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        return [], (
            f"cannot read it ({type(exc).__name__}: {exc}); expected a .npy or .npz file that "
            "numpy.load reads without pickle"
        )
    try:
        return producer.submit_many(items, colormap=colormap, fade_low_activation=fade), None
    except PermanentError as exc:
        sent: list[PendingMap] = exc.submitted  # type: ignore[attr-defined]
        name = items[len(sent)][2]
        where = "" if name is None else f" array {name!r} ({len(sent)} of its {len(items)} maps submitted)"
        return sent, f"refused{where}: {type(exc).__name__}: {exc}"


def main() -> None:
    cli(prog_name="actmap")


if __name__ == "__main__":
    main()
