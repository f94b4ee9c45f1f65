"""The embedded default, local-folder storage, the CLI and the storage retry bound, on real processes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer import Producer, Settings
from tests.integration.conftest import Stack
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.workers import WorkerProcess, clean_env
from worker.render import colorize, render_png
from worker.storage import FileStorage


def actmap(
    *args: str, env: dict[str, str], cwd: Path, timeout_s: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=clean_env(env),
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def decode(locator: str) -> np.ndarray:
    return np.asarray(Image.open(locator.removeprefix("file://")).convert("RGBA"))


def test_local_folder_storage_writes_pngs_that_decode_to_the_colorized_map(local_stack: Stack) -> None:
    cam = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    with local_stack.producer() as producer:
        result = producer.collect([producer.submit("folder/map", cam)], timeout=60)[0]
    assert result.locator == f"{local_stack.env['ACTMAP_STORAGE_URL']}/folder/map.png"
    np.testing.assert_array_equal(decode(result.locator), colorize(cam))


def test_the_embedded_default_needs_no_server_with_producer_and_worker_in_two_processes(
    tmp_path: Path,
) -> None:
    # Given only a home folder: no broker, no result backend, no storage configured
    env = {"ACTMAP_HOME": str(tmp_path / "home")}
    worker = WorkerProcess(env, tmp_path)
    try:
        # When this process submits and collects
        cam = np.random.default_rng(9).random((50, 40)).astype(np.float32)
        with Producer(Settings(home=tmp_path / "home")) as producer:
            results = producer.collect([producer.submit("embedded", cam)], timeout=60)
    finally:
        worker.stop()
    # Then the map was rendered by the other process into the home folder
    assert results[0].locator == (tmp_path / "home" / "maps" / "embedded.png").as_uri()
    np.testing.assert_array_equal(decode(results[0].locator), colorize(cam))
    assert "embedded" in worker.log()


def test_cli_submit_then_collect_round_trips_npy_and_npz_files(local_stack: Stack, tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    (maps / "val").mkdir(parents=True)
    rng = np.random.default_rng(10)
    np.save(maps / "val" / "a.npy", rng.random((16, 16), dtype=np.float32))
    np.save(maps / "b.npy", rng.integers(0, 256, (8, 12), dtype=np.uint8))
    np.savez(maps / "c.npz", cat=rng.random((8, 8)), dog=rng.random((8, 8)))

    submitted = actmap("submit", str(maps), env=local_stack.env, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    pending = [json.loads(line) for line in submitted.stdout.splitlines()]
    assert sorted((p["image_id"], p["name"]) for p in pending) == [
        ("b", None),
        ("c", "cat"),
        ("c", "dog"),
        ("val/a", None),
    ]
    assert "run id:" in submitted.stderr

    (tmp_path / "pending.jsonl").write_text(submitted.stdout)
    collected = actmap("collect", str(tmp_path / "pending.jsonl"), env=local_stack.env, cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    rows = [json.loads(line) for line in collected.stdout.splitlines()]
    assert [(r["image_id"], r["name"], r["ok"]) for r in rows] == [
        (p["image_id"], p["name"], True) for p in pending
    ]
    by_id = {(r["image_id"], r["name"]): r for r in rows}
    np.testing.assert_array_equal(
        decode(by_id[("val/a", None)]["locator"]), colorize(np.load(maps / "val" / "a.npy"))
    )
    assert by_id[("c", "cat")]["bitmap_mask"]["data_type"] == "ANNOTATION/BITMAP_MASK"


def test_cli_submit_of_a_bad_map_file_says_what_is_wrong(local_stack: Stack, tmp_path: Path) -> None:
    np.save(tmp_path / "rgb.npy", np.zeros((4, 4, 3), np.uint8))
    submitted = actmap("submit", str(tmp_path / "rgb.npy"), env=local_stack.env, cwd=tmp_path)
    assert submitted.returncode != 0
    assert "InvalidMapError" in submitted.stderr and "3 channels" in submitted.stderr


BAD_FILES = {
    "unreadable": (b"not a numpy file", "cannot read it (ValueError: "),
    "refused": (
        np.zeros((4, 4, 3), np.uint8),
        "refused: InvalidMapError: activation map has shape (4, 4, 3)",
    ),
}


def write_map_files(folder: Path, bad: int, kind: str) -> list[Path]:
    """Three map files, f0..f2, the one at ``bad`` unreadable or refused, and an .npz of two maps."""
    rng = np.random.default_rng(14)
    files = []
    for i in range(3):
        file = folder / f"f{i}.npy"
        if i == bad:
            content, _ = BAD_FILES[kind]
            if isinstance(content, bytes):
                file.write_bytes(content)
            else:
                np.save(file, content)
        else:
            np.save(file, rng.random((12, 10), dtype=np.float32))
        files.append(file)
    np.savez(folder / "pair.npz", cat=rng.random((8, 8)), dog=rng.random((8, 8)))
    return [*files[:2], folder / "pair.npz", files[2]]  # the bad file first, in the middle or last


def identities(files: list[Path]) -> list[tuple[str, str | None]]:
    """The (image id, name) of each map of write_map_files's files, in order."""
    pairs: list[tuple[str, str | None]] = []
    for file in files:
        pairs += [("pair", "cat"), ("pair", "dog")] if file.suffix == ".npz" else [(file.stem, None)]
    return pairs


def collect_pending(stack: Stack, tmp_path: Path, pending: str) -> list[dict[str, object]]:
    (tmp_path / "pending.jsonl").write_text(pending)
    collected = actmap("collect", str(tmp_path / "pending.jsonl"), env=stack.env, cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    return [json.loads(line) for line in collected.stdout.splitlines()]


@pytest.mark.parametrize("kind", BAD_FILES)
@pytest.mark.parametrize("bad", [0, 1, 2], ids=["first", "middle", "last"])
def test_cli_submit_reports_a_bad_file_submits_every_other_and_exits_1(
    local_stack: Stack, tmp_path: Path, bad: int, kind: str
) -> None:
    # Given four files, one of them unreadable or holding a map submit refuses
    files = write_map_files(tmp_path, bad, kind)
    bad_file = tmp_path / f"f{bad}.npy"
    # When they are submitted
    submitted = actmap("submit", *map(str, files), env=local_stack.env, cwd=tmp_path)
    # Then the bad file is reported with its path and reason, and the exit code says so
    assert submitted.returncode == 1, submitted.stderr
    assert f"{bad_file}: {BAD_FILES[kind][1]}" in submitted.stderr
    assert "1 file(s) not read or refused, 4 map(s) submitted" in submitted.stderr
    # And every other map has its line, and its result
    pending = [json.loads(line) for line in submitted.stdout.splitlines()]
    assert [(p["image_id"], p["name"]) for p in pending] == identities([f for f in files if f != bad_file])
    rows = collect_pending(local_stack, tmp_path, submitted.stdout)
    assert [(r["image_id"], r["name"], r["ok"]) for r in rows] == [
        (p["image_id"], p["name"], True) for p in pending
    ]


@pytest.mark.parametrize("bad", [0, 1, 2], ids=["first", "middle", "last"])
def test_cli_submit_strict_stops_at_the_first_bad_file_having_printed_what_it_sent(
    local_stack: Stack, tmp_path: Path, bad: int
) -> None:
    files = write_map_files(tmp_path, bad, "refused")
    bad_file = tmp_path / f"f{bad}.npy"
    submitted = actmap("submit", "--strict", *map(str, files), env=local_stack.env, cwd=tmp_path)
    assert submitted.returncode == 1, submitted.stderr
    assert f"{bad_file}: {BAD_FILES['refused'][1]}" in submitted.stderr
    assert "--strict: stopped at it" in submitted.stderr
    pending = [json.loads(line) for line in submitted.stdout.splitlines()]
    assert [(p["image_id"], p["name"]) for p in pending] == identities(files[: files.index(bad_file)])
    if pending:  # a bad first file: nothing sent, nothing to collect
        rows = collect_pending(local_stack, tmp_path, submitted.stdout)
        assert [(r["image_id"], r["name"], r["ok"]) for r in rows] == [
            (p["image_id"], p["name"], True) for p in pending
        ]


def test_cli_submit_of_an_npz_with_a_bad_array_names_it_and_submits_the_arrays_before_it(
    local_stack: Stack, tmp_path: Path
) -> None:
    np.savez(tmp_path / "c.npz", a=np.zeros((4, 4)), b=np.full((4, 4), 3.0), c=np.zeros((4, 4)))
    submitted = actmap("submit", str(tmp_path / "c.npz"), env=local_stack.env, cwd=tmp_path)
    assert submitted.returncode == 1, submitted.stderr
    assert f"{tmp_path / 'c.npz'}: refused array 'b' (1 of its 3 maps submitted): InvalidMapError:" in (
        submitted.stderr
    )
    assert [json.loads(line)["name"] for line in submitted.stdout.splitlines()] == ["a"]


def test_actmap_demo_prints_locators_of_jet_pngs_and_writes_overlays(tmp_path: Path) -> None:
    result = actmap("demo", "--count", "3", env={"ACTMAP_HOME": str(tmp_path / "home")}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    locators = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("  demo-")]
    assert len(locators) == 3
    for locator in locators:
        rgba = decode(locator)
        assert rgba.shape == (224, 224, 4)
        # a Grad-CAM-like map: faded (transparent) background, a dark-red-to-red hot centre
        assert rgba[..., 3].min() == 0
        hottest = np.unravel_index(np.argmax(rgba[..., 3]), rgba.shape[:2])
        assert rgba[hottest][0] >= 128 and rgba[hottest][2] == 0
    overlays = sorted((tmp_path / "home" / "demo" / "overlays").glob("*.png"))
    assert len(overlays) == 3


def test_sweep_temporary_files_deletes_only_what_cut_short_writes_left_long_ago(tmp_path: Path) -> None:
    # Given a map folder with a map, what a write killed an hour ago left, a write under way,
    # and an old file of someone else's
    maps = tmp_path / "maps"
    stored = FileStorage(maps).put("val/img-1.png", b"a whole png")
    stale = maps / "val" / ".img-2.png.4242-139872.tmp"
    stale.write_bytes(b"half a png")
    under_way = maps / "val" / ".img-3.png.4243-139873.tmp"
    under_way.write_bytes(b"being written")
    not_ours = maps / "val" / "notes.tmp"
    not_ours.write_text("keep me")
    an_hour_ago = time.time() - 3600
    for path in (stale, not_ours):
        os.utime(path, (an_hour_ago, an_hour_ago))
    # When the sweep runs
    run = actmap(
        "sweep-temporary-files",
        "--older-than",
        "600",
        env={"ACTMAP_STORAGE_URL": maps.as_uri(), "ACTMAP_HOME": str(tmp_path / "home")},
        cwd=tmp_path,
    )
    # Then only the stale temporary file is gone, and it says so
    assert run.returncode == 0, run.stderr
    assert "deleted 1 temporary file(s) (10 bytes) older than 600 s" in run.stdout
    assert not stale.exists()
    assert under_way.exists() and not_ours.exists()
    assert Path(stored.locator.removeprefix("file://")).read_bytes() == b"a whole png"


def test_sweep_temporary_files_says_s3_storage_has_none(tmp_path: Path) -> None:
    run = actmap("sweep-temporary-files", env={"ACTMAP_STORAGE_URL": "s3://bucket/maps"}, cwd=tmp_path)
    assert run.returncode != 0
    assert "storage s3://bucket/maps is not a local folder" in run.stderr


def test_storage_errors_are_retried_with_backoff_up_to_the_bound_then_reported(tmp_path: Path) -> None:
    # Given a worker whose S3 endpoint refuses every connection, with a small retry bound
    with RedisServer() as redis_server:
        env = {
            "ACTMAP_HOME": str(tmp_path / "home"),
            "ACTMAP_BROKER_URL": redis_server.url(0),
            "ACTMAP_RESULT_BACKEND": redis_server.url(1),
            "ACTMAP_STORAGE_URL": "s3://nowhere/maps",
            "ACTMAP_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "ACTMAP_STORAGE_MAX_ATTEMPTS": "2",
            "ACTMAP_TASK_MAX_RETRIES": "2",
            "ACTMAP_RETRY_BACKOFF_MAX_S": "1",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        stack = Stack(env=env, log_dir=tmp_path)
        stack.start_worker()
        try:
            # When a map is submitted
            with stack.producer() as producer:
                result = producer.collect(
                    [producer.submit("unlucky", np.zeros((4, 4), np.uint8))], timeout=120
                )[0]
        finally:
            stack.stop()
    # Then it ends FAILED, naming the cause, after exactly the configured retries
    assert result.error is not None
    assert result.error.type == "StorageError"
    assert "gave up after 2 retries" in result.error.message
    assert "Could not connect" in result.error.message
    assert stack.worker_logs().count("retrying 1 map(s)") == 2


@pytest.mark.parametrize("publisher", ["thread", "none"])
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_buffer_the_caller_reuses_right_after_submit_does_not_change_the_map_sent(
    local_stack: Stack, dtype: str, publisher: str
) -> None:
    # Given a publisher that waits 2 s for a fuller message before packing what it holds
    settings = local_stack.settings.model_copy(
        update={
            "publish_linger_s": 2.0,
            "batch_size": 64,
            "background_publish": publisher != "none",
        }
    )
    rng = np.random.default_rng(11)
    first = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    buffer = first.copy() if dtype == "uint8" else (first / 255).astype(np.float32)
    expected = colorize(buffer)
    with Producer(settings) as producer:
        # When the loop overwrites its buffer with the next map as soon as submit returns
        handle = producer.submit(f"reused/{dtype}/{publisher}", buffer)
        buffer[...] = buffer[::-1]
        result = producer.collect([handle], timeout=60)[0]
    # Then the map stored is the one submitted
    assert result.ok, result.error
    np.testing.assert_array_equal(decode(result.locator), expected)


@pytest.mark.parametrize("level", [0, 1, 3])
def test_the_stored_png_is_render_pngs_png_at_the_producers_deflate_level(
    local_stack: Stack, level: int
) -> None:
    # Given float and uint8 maps from a producer deflating at ACTMAP_PNG_COMPRESS_LEVEL=level
    rng = np.random.default_rng(8)
    maps = [rng.random((48, 40), dtype=np.float32), rng.integers(0, 256, (30, 20), dtype=np.uint8)]
    settings = local_stack.settings.model_copy(update={"png_compress_level": level})
    # When each is submitted and collected
    with Producer(settings) as producer:
        handles = [producer.submit(f"level-{level}/map-{i}", cam) for i, cam in enumerate(maps)]
        results = producer.collect(handles, timeout=60)
    assert all(r.locator for r in results), [r.error for r in results]
    pngs = [Path(r.locator.removeprefix("file://")).read_bytes() for r in results if r.locator]
    # Then each PNG is byte for byte render_png's at that level, and decodes to the colorized map
    assert pngs == [render_png(cam, compress_level=level) for cam in maps]
    for cam, png in zip(maps, pngs, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")), colorize(cam))


def test_maps_of_other_array_libraries_arrive_as_the_same_pngs_as_numpy_maps(local_stack: Stack) -> None:
    import array_api_strict
    import jax.numpy as jnp

    # Given the same float32 maps as numpy arrays, JAX arrays and arrays on a device numpy cannot
    # read (array-api-strict's "device1", which lends its memory through DLPack only, as a GPU does)
    rng = np.random.default_rng(12)
    maps = [rng.random((40, 56), dtype=np.float32) for _ in range(3)]
    device = array_api_strict.Device("device1")
    forms = {
        "numpy": maps,
        "jax": [jnp.asarray(cam) for cam in maps],
        "device": [array_api_strict.asarray(cam, device=device) for cam in maps],
    }
    pngs: dict[str, list[bytes]] = {}
    with local_stack.producer() as producer:
        # When each is submitted under its own image ids and collected
        for form, arrays in forms.items():
            handles = [producer.submit(f"{form}/map-{i}", cam) for i, cam in enumerate(arrays)]
            results = producer.collect(handles, timeout=60)
            assert all(r.locator for r in results), [r.error for r in results]
            pngs[form] = [Path(r.locator.removeprefix("file://")).read_bytes() for r in results if r.locator]
    # Then every form gives the very PNGs of the numpy maps
    assert pngs["jax"] == pngs["numpy"] and pngs["device"] == pngs["numpy"]
    for cam, png in zip(maps, pngs["numpy"], strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")), colorize(cam))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_batch_goes_through_a_worker_to_the_pngs_of_render_png_of_each_map(
    local_stack: Stack, dtype: str
) -> None:
    # Given a (B, 1, H, W) batch, as a model's output is, and a publisher that waits before packing
    rng = np.random.default_rng(13)
    maps = rng.random((5, 1, 36, 28), dtype=np.float32)
    if dtype == "uint8":
        maps = (maps * 255).astype(np.uint8)
    expected = [render_png(cam[0]) for cam in maps]
    settings = local_stack.settings.model_copy(update={"publish_linger_s": 1.0, "batch_size": 2})
    with Producer(settings) as producer:
        # When it is submitted in one call, and the caller reuses its buffer at once
        handles = producer.submit_batch([f"batch/{dtype}/{i}" for i in range(5)], maps)
        maps[...] = 0
        results = producer.collect(handles, timeout=60)
    # Then each map is stored as render_png's PNG of that map
    assert all(r.locator for r in results), [r.error for r in results]
    assert [Path(r.locator.removeprefix("file://")).read_bytes() for r in results if r.locator] == expected


def test_the_global_cli_flags_reach_the_worker_and_submit_and_collect_and_their_options_apply(
    module_redis: RedisServer, tmp_path: Path
) -> None:
    # Given no settings in the environment but a home folder of its own (where, were the flags
    # ignored, worker and CLI would meet through the embedded default) and a worker started as
    # `actmap --broker-url … --result-backend … --queue … --storage-url … worker`
    module_redis.client(8).flushdb()
    env = {"ACTMAP_HOME": str(tmp_path / "decoy-home")}
    flags = (
        "--broker-url", module_redis.url(8),
        "--result-backend", module_redis.url(9),
        "--queue", "cli-flags-queue",
        "--storage-url", f"file://{tmp_path / 'flag-maps'}",
    )  # fmt: skip
    worker = WorkerProcess(env, tmp_path, global_args=flags)
    try:
        cam = np.random.default_rng(11).random((24, 20), dtype=np.float32)
        np.save(tmp_path / "a.npy", cam)
        # When the CLI, given the same flags, submits under a chosen run id, colormap and no fade
        submitted = actmap(
            *flags, "submit", "--run-id", "flags-run", "--colormap", "viridis", "--no-fade",
            str(tmp_path / "a.npy"), env=env, cwd=tmp_path,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        # and collects that run's map by --run-id and --image-id, and one never sent, for 3 s
        collected = actmap(
            *flags, "collect", "--run-id", "flags-run", "--image-id", "a", "--image-id", "never-sent",
            "--timeout", "3", env=env, cwd=tmp_path,
        )  # fmt: skip
    finally:
        worker.stop()
    # Then the worker listened on the queue named and the map went through it, under that run id
    assert ".> cli-flags-queue" in worker.log()
    assert [json.loads(line) for line in submitted.stdout.splitlines()] == [
        {"run_id": "flags-run", "image_id": "a", "name": None}
    ]
    # and collect printed what it had when it timed out, the pending one failed, and exited 1
    assert collected.returncode == 1, collected.stderr
    assert "timeout: 1 of 2 map results still pending" in collected.stderr
    done, pending = (json.loads(line) for line in collected.stdout.splitlines())
    assert (done["image_id"], done["ok"], pending["image_id"], pending["ok"]) == (
        "a",
        True,
        "never-sent",
        False,
    )
    # and the PNG is in the storage folder named, render_png's with that colormap and no fade
    stored = tmp_path / "flag-maps" / "a.png"
    assert done["locator"] == stored.as_uri()
    level = Settings().png_compress_level
    assert stored.read_bytes() == render_png(cam, "viridis", False, compress_level=level)
    assert stored.read_bytes() != render_png(cam, compress_level=level)  # the options changed it
    assert not (tmp_path / "decoy-home" / "maps").exists()


def test_the_home_flag_puts_the_embedded_default_of_worker_and_cli_in_that_folder(tmp_path: Path) -> None:
    # Given a worker started as `actmap --home H worker`, with another home in the environment
    env = {"ACTMAP_HOME": str(tmp_path / "decoy-home")}
    home = ("--home", str(tmp_path / "flag-home"))
    worker = WorkerProcess(env, tmp_path, global_args=home)
    try:
        np.save(tmp_path / "m.npy", np.zeros((8, 8), np.uint8))
        # When `actmap --home H submit` and `collect` go through the embedded default
        submitted = actmap(*home, "submit", str(tmp_path / "m.npy"), env=env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        collected = actmap(*home, "collect", "--timeout", "60", input=submitted.stdout, env=env, cwd=tmp_path)
    finally:
        worker.stop()
    # Then the map met the worker in H, and its PNG is in H's maps folder, none in the other home
    assert collected.returncode == 0, collected.stderr
    (row,) = (json.loads(line) for line in collected.stdout.splitlines())
    assert row["ok"] and row["locator"] == (tmp_path / "flag-home" / "maps" / "m.png").as_uri()
    assert not (tmp_path / "decoy-home").exists()
