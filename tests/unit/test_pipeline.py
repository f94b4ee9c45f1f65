"""worker.pipeline on its own: maps in, outcomes out, PNGs in a local folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from producer.errors import InvalidImageIdError
from producer.keys import result_id
from producer.settings import Settings
from producer.wire import MapMessage, encode_map
from worker.pipeline import Done, Failed, Pipeline, Postponed
from worker.render import render_png
from worker.storage import FileStorage, StorageLocation


def payload(image_id: str, array: np.ndarray) -> bytes:
    return encode_map(MapMessage("run-1", image_id, None, array))


def make_pipeline(tmp_path: Path, **settings: object) -> Pipeline:
    return Pipeline(
        Settings(home=tmp_path / "home", **settings),  # type: ignore[arg-type]
        StorageLocation(FileStorage(tmp_path / "maps"), ""),
        upload_threads=2,
    )


def maps(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (12, 16), dtype=np.uint8) for _ in range(count)]


def test_every_map_of_a_batch_is_stored_and_reported_done(tmp_path: Path) -> None:
    arrays = maps(5)
    outcomes = list(
        make_pipeline(tmp_path).process_batch([payload(f"b/{i}", a) for i, a in enumerate(arrays)])
    )
    assert all(isinstance(o, Done) for o in outcomes)
    done = {o.result_id: o.result for o in outcomes if isinstance(o, Done)}
    for i, array in enumerate(arrays):
        result = done[result_id("run-1", f"b/{i}", None)]
        assert result["locator"] == (tmp_path / "maps" / f"b/{i}.png").as_uri()
        assert (tmp_path / "maps" / f"b/{i}.png").read_bytes() == render_png(array)


def test_a_bad_map_fails_alone_and_its_neighbours_are_stored(tmp_path: Path) -> None:
    good = maps(1)[0]
    outcomes = list(make_pipeline(tmp_path).process_batch([payload("ok/1", good), b"\x93not a map"]))
    assert sorted(type(o).__name__ for o in outcomes) == ["Done", "Failed"]
    failed = next(o for o in outcomes if isinstance(o, Failed))
    assert failed.result_id is None and "not" in str(failed.error)
    assert (tmp_path / "maps" / "ok/1.png").exists()


def test_maps_not_started_before_the_deadline_come_back_postponed_untouched(tmp_path: Path) -> None:
    payloads = [payload(f"late/{i}", a) for i, a in enumerate(maps(3))]
    outcomes = list(make_pipeline(tmp_path).process_batch(payloads, deadline=time.monotonic() - 1))
    assert [o.payload for o in outcomes if isinstance(o, Postponed)] == payloads
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize(("log_each_map", "level"), [(False, logging.DEBUG), (True, logging.INFO)])
def test_the_line_per_map_stored_is_info_only_when_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, log_each_map: bool, level: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="actmap.worker")
    pipeline = make_pipeline(tmp_path, log_each_map=log_each_map)
    list(pipeline.process_batch([payload(f"log/{i}", a) for i, a in enumerate(maps(3))]))
    stored = [r for r in caplog.records if "stored at" in r.getMessage()]
    assert [r.levelno for r in stored] == [level] * 3
    assert "map 'log/0' stored at file://" in caplog.text


def test_an_object_key_the_storage_refuses_is_that_maps_failure(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "maps" / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    outcomes = list(make_pipeline(tmp_path).process_batch([payload("link/x", maps(1)[0])]))
    assert len(outcomes) == 1 and isinstance(outcomes[0], Failed)
    assert isinstance(outcomes[0].error, InvalidImageIdError)
    assert outcomes[0].result_id == result_id("run-1", "link/x", None)
    assert list((tmp_path / "outside").iterdir()) == []
