"""producer.results: what a worker records per map, and the MapResult collect returns."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest

from producer.errors import CollectTimeoutError, InvalidMapError
from producer.results import BITMAP_MASK_DATA_TYPE, MapError, MapResult, bitmap_mask, success_result

_LOCATOR = "s3://bucket/prefix/val/img-001~cat.png"


def _success() -> dict[str, Any]:
    return success_result(
        image_id="val/img-001", name="cat", locator=_LOCATOR, width=7, height=5, size=123, checksum="md5:ab"
    )


def test_a_bitmap_mask_is_kolenas_serialized_form() -> None:
    assert bitmap_mask(_LOCATOR) == {"locator": _LOCATOR, "data_type": "ANNOTATION/BITMAP_MASK"}
    assert BITMAP_MASK_DATA_TYPE == "ANNOTATION/BITMAP_MASK"


def test_a_success_result_carries_every_documented_field() -> None:
    assert _success() == {
        "image_id": "val/img-001",
        "name": "cat",
        "locator": _LOCATOR,
        "bitmap_mask": {"locator": _LOCATOR, "data_type": "ANNOTATION/BITMAP_MASK"},
        "width": 7,
        "height": 5,
        "bytes": 123,
        "checksum": "md5:ab",
    }


def test_a_success_result_survives_the_msgpack_result_backend_unchanged() -> None:
    stored = msgpack.unpackb(msgpack.packb(_success(), use_bin_type=True), raw=False)
    assert stored == _success()
    result = MapResult.from_success("val/img-001", "cat", stored)
    assert result.ok
    assert (result.locator, result.width, result.height, result.bytes) == (_LOCATOR, 7, 5, 123)
    assert result.bitmap_mask == bitmap_mask(_LOCATOR)
    assert result.error is None


def test_a_map_result_does_not_share_the_bitmap_mask_of_the_backend_record() -> None:
    record = _success()
    result = MapResult.from_success("val/img-001", "cat", record)
    record["bitmap_mask"]["locator"] = "s3://other/x.png"
    assert result.bitmap_mask == bitmap_mask(_LOCATOR)


def test_a_success_prints_as_json_with_ok_true_and_no_error() -> None:
    line = json.loads(json.dumps(MapResult.from_success("val/img-001", "cat", _success()).to_dict()))
    assert line == {
        "image_id": "val/img-001",
        "name": "cat",
        "ok": True,
        "locator": _LOCATOR,
        "bitmap_mask": {"locator": _LOCATOR, "data_type": "ANNOTATION/BITMAP_MASK"},
        "width": 7,
        "height": 5,
        "bytes": 123,
        "checksum": "md5:ab",
        "error": None,
    }


def test_a_failure_carries_the_errors_type_and_message_and_no_locator() -> None:
    result = MapResult.from_failure("a", None, InvalidMapError("map is empty; expected h, w >= 1"))
    assert not result.ok
    assert result.error == MapError("InvalidMapError", "map is empty; expected h, w >= 1")
    assert str(result.error) == "InvalidMapError: map is empty; expected h, w >= 1"
    assert result.to_dict() == {
        "image_id": "a",
        "name": None,
        "ok": False,
        "locator": None,
        "bitmap_mask": None,
        "width": None,
        "height": None,
        "bytes": None,
        "checksum": None,
        "error": {"type": "InvalidMapError", "message": "map is empty; expected h, w >= 1"},
    }


def test_a_timeout_failure_keeps_only_its_message() -> None:
    error = CollectTimeoutError("2 of 3 map results still pending after 5 s", pending=2, total=3)
    assert MapResult.from_failure("a", "cat", error).error == MapError(
        "CollectTimeoutError", "2 of 3 map results still pending after 5 s"
    )


@pytest.mark.parametrize("error", [{"exc_type": "X"}, "boom", None, 3])
def test_a_failure_that_is_not_an_exception_is_an_unknown_error_showing_its_repr(error: object) -> None:
    result = MapResult.from_failure("a", None, error)
    assert result.error == MapError("UnknownError", repr(error))
    assert json.dumps(result.to_dict())
