"""producer.wire: the map message round trip, and what decode_map refuses (and how)."""

from __future__ import annotations

import tracemalloc
import zlib
from functools import partial
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.errors import InvalidMapError, PermanentError, WireFormatError
from producer.wire import (
    ARRAY_VERSION,
    COLORMAPS,
    DTYPES,
    MapDecodeError,
    MapMessage,
    decode_map,
    encode_map,
    validate_colormap,
)
from tests.support.wire import decode_refusal, packed
from worker.colormaps import COLORMAP_NAMES

MAX_PIXELS = 64 * 64
MAX_MESSAGE_BYTES = 64 * 1024
FIELDS = ("v", "run", "id", "name", "dtype", "shape", "data", "colormap", "fade")


# decode_map and its refusals under this file's limits (a test may pass others).
_decode = partial(decode_map, max_pixels=MAX_PIXELS, max_message_bytes=MAX_MESSAGE_BYTES)
_refusal = partial(decode_refusal, max_pixels=MAX_PIXELS, max_message_bytes=MAX_MESSAGE_BYTES)


def _fields(**changes: Any) -> dict[str, Any]:
    """A valid message's fields: a 2x3 uint8 map of image 'val/img-001', map 'cat', run 'run-1'."""
    fields: dict[str, Any] = {
        "v": ARRAY_VERSION,
        "run": "run-1",
        "id": "val/img-001",
        "name": "cat",
        "dtype": "uint8",
        "shape": [2, 3],
        "data": bytes(range(6)),
        "colormap": "jet",
        "fade": True,
    }
    fields.update(changes)
    return fields


def _map(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    if dtype == "uint8":
        return (np.arange(size) % 256).astype(np.uint8).reshape(shape)
    return np.linspace(0.0, 1.0, size).astype(dtype).reshape(shape)


# --- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 1), (1, 1), (17, 5)])
def test_every_dtype_and_shape_round_trips_exactly(dtype: str, shape: tuple[int, ...]) -> None:
    array = _map(dtype, shape)
    message = MapMessage("run-1", "val/img-001", "cat", array, "jet", False)
    decoded = _decode(encode_map(message))
    assert decoded.array.shape == shape
    assert decoded.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded.array, array)
    assert (decoded.run_id, decoded.image_id, decoded.name) == ("run-1", "val/img-001", "cat")
    assert (decoded.colormap, decoded.fade_low_activation) == ("jet", False)


def test_an_unnamed_map_round_trips_with_no_name_and_fade_on() -> None:
    decoded = _decode(encode_map(MapMessage("r", "a", None, _map("uint8", (2, 2)))))
    assert decoded.name is None
    assert decoded.fade_low_activation is True


def test_the_message_carries_exactly_the_documented_fields() -> None:
    fields = msgpack.unpackb(encode_map(MapMessage("r", "a", None, _map("float32", (2, 3)))))
    assert set(fields) == set(FIELDS)
    assert fields["v"] == ARRAY_VERSION
    assert fields["shape"] == [2, 3]
    assert isinstance(fields["data"], bytes)
    assert len(fields["data"]) == 2 * 3 * 4


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_big_endian_maps_are_sent_little_endian(dtype: str) -> None:
    array = _map(dtype, (3, 4)).astype(np.dtype(dtype).newbyteorder(">"))
    fields = msgpack.unpackb(encode_map(MapMessage("r", "a", None, array)))
    assert fields["dtype"] == dtype
    assert fields["data"] == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = _decode(encode_map(MapMessage("r", "a", None, array)))
    np.testing.assert_array_equal(decoded.array, array)


def test_strided_and_fortran_ordered_maps_are_sent_in_c_order() -> None:
    base = _map("uint8", (6, 8))
    for array in (base[:, ::2], base.T, np.asfortranarray(base)):
        decoded = _decode(encode_map(MapMessage("r", "a", None, array)))
        np.testing.assert_array_equal(decoded.array, array)


@pytest.mark.parametrize("dtype", ["int32", "uint16", "bool", "complex64", "float128"])
def test_encoding_a_dtype_the_format_lacks_is_refused_naming_it(dtype: str) -> None:
    if not hasattr(np, dtype):
        pytest.skip(f"numpy has no {dtype} here")
    with pytest.raises(InvalidMapError, match=f"dtype {dtype} cannot be sent; expected one of uint8"):
        encode_map(MapMessage("r", "a", None, np.zeros((2, 2), dtype=dtype)))


def test_the_worker_renders_exactly_the_colormaps_the_wire_format_accepts() -> None:
    assert COLORMAP_NAMES == COLORMAPS


def test_validate_colormap_accepts_the_known_names_and_refuses_others() -> None:
    assert validate_colormap("jet") == "jet"
    for colormap in ("cividis", "JET", "", None, 1, ["jet"]):
        with pytest.raises(InvalidMapError, match=r"unknown colormap .*; expected one of jet"):
            validate_colormap(colormap)


# --- refusals -------------------------------------------------------------------------------


def test_bytearray_and_memoryview_payloads_are_accepted() -> None:
    payload = packed(_fields())
    assert _decode(bytearray(payload)).image_id == "val/img-001"
    assert _decode(memoryview(payload)).image_id == "val/img-001"


@pytest.mark.parametrize("payload", ["text", None, 3, [b"x"], {"v": 1}])
def test_a_payload_that_is_not_bytes_is_refused_naming_its_type(payload: object) -> None:
    error = _refusal(payload)
    assert f"must be bytes, received {type(payload).__name__}" in str(error)
    assert error.identity is None


def test_a_payload_over_the_size_limit_is_refused_before_it_is_unpacked() -> None:
    payload = packed(_fields())
    error = _refusal(payload, max_message_bytes=len(payload) - 1)
    assert f"is {len(payload)} bytes; expected at most {len(payload) - 1}" in str(error)
    assert error.identity is None
    assert _decode(payload, max_message_bytes=len(payload)).image_id == "val/img-001"


def test_the_size_limit_counts_bytes_of_a_multi_dimensional_memoryview() -> None:
    # Given a 2-D byte view, whose len() is its number of rows, not of bytes...
    payload = packed(_fields(data=bytes(64 * 64), shape=[64, 64]))
    rows = np.frombuffer(payload + bytes(-len(payload) % 16), dtype=np.uint8).reshape(-1, 16)
    view = memoryview(rows)
    assert len(view) < 1024 < view.nbytes
    # ...the limit still applies to its bytes.
    error = _refusal(view, max_message_bytes=1024)
    assert f"is {view.nbytes} bytes" in str(error)


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", packed(_fields()) + b"\x00"])
def test_bytes_that_are_not_one_msgpack_value_are_refused(payload: bytes) -> None:
    error = _refusal(payload)
    assert "not valid msgpack" in str(error)
    assert error.identity is None


@pytest.mark.parametrize(
    "fields", [_fields(), _fields(dtype="float64", shape=[8, 16, 1], data=bytes(8 * 16 * 8))]
)
def test_a_valid_message_cut_short_at_any_length_is_refused(fields: dict[str, Any]) -> None:
    payload = packed(fields)
    for length in range(len(payload)):
        with pytest.raises(MapDecodeError):
            _decode(payload[:length])


@pytest.mark.parametrize("value", [[1, 2], 1, "map", None, b"map", 1.5, True])
def test_a_message_that_is_not_a_msgpack_map_is_refused_naming_what_it_is(value: object) -> None:
    error = _refusal(packed(value))
    assert f"must be a msgpack map, received {type(value).__name__}" in str(error)
    assert error.identity is None


def test_a_map_with_non_string_keys_is_refused() -> None:
    assert _refusal(packed({1: 2, **_fields()})).identity is None


@pytest.mark.parametrize("field", [f for f in FIELDS if f != "v"])
def test_a_message_missing_a_field_is_refused_naming_it(field: str) -> None:
    fields = _fields()
    del fields[field]
    error = _refusal(packed(fields))
    assert f"lacks field(s) {field}" in str(error)


def test_a_message_missing_its_version_is_refused_as_of_an_unknown_version() -> None:
    fields = _fields()
    del fields["v"]
    assert "version is None; this worker reads versions 1 and 2" in str(_refusal(packed(fields)))


@pytest.mark.parametrize("version", [0, 3, -1, "1", None, True, 1.0, [1]])
def test_a_message_of_another_version_is_refused_saying_which_one_is_read(version: object) -> None:
    error = _refusal(packed(_fields(v=version)))
    assert f"version is {version!r}; this worker reads versions 1 and 2" in str(error)
    assert error.identity == ("run-1", "val/img-001", "cat")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("run", 7, "'run' must be str, received int"),
        ("run", b"run-1", "'run' must be str, received bytes"),
        ("id", 7, "image id must be a str, received int"),
        ("id", b"val/img", "image id must be a str, received bytes"),
        ("name", 7, "map name must be a str or None, received int"),
        ("dtype", 7, "'dtype' must be str, received int"),
        ("data", "text", "'data' must be bytes, received str"),
        ("data", [0, 1, 2, 3, 4, 5], "'data' must be bytes, received list"),
        ("data", None, "'data' must be bytes, received NoneType"),
        ("fade", 1, "'fade' must be bool, received int"),
        ("fade", "yes", "'fade' must be bool, received str"),
        ("fade", None, "'fade' must be bool, received NoneType"),
        ("colormap", None, "unknown colormap None"),
        ("shape", "2x3", "shape must be [h, w] or [h, w, 1] of ints, received '2x3'"),
        ("shape", {"h": 2, "w": 3}, "shape must be [h, w] or [h, w, 1] of ints"),
        ("shape", 6, "shape must be [h, w] or [h, w, 1] of ints, received 6"),
        ("shape", None, "shape must be [h, w] or [h, w, 1] of ints, received None"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_naming_the_field_and_the_type(
    field: str, value: object, words: str
) -> None:
    error = _refusal(packed(_fields(**{field: value})))
    assert words in str(error)
    assert isinstance(error, WireFormatError)


@pytest.mark.parametrize(
    "shape",
    [
        [True, 3],
        [2, True],
        [2, 3, True],
        [2.0, 3],
        [2, 3.0],
        ["2", 3],
        [None, 3],
        [2],
        [],
        [2, 3, 1, 1],
        [[2], 3],
    ],
)
def test_a_shape_that_is_not_two_or_three_plain_ints_is_refused(shape: list[Any]) -> None:
    assert "shape must be [h, w] or [h, w, 1] of ints" in str(_refusal(packed(_fields(shape=shape))))


@pytest.mark.parametrize("shape", [[2, 3, 3], [2, 3, 4], [2, 3, 0], [2, 3, -1]])
def test_a_shape_with_other_than_one_channel_is_refused(shape: list[int]) -> None:
    assert f"has {shape[2]} channels; expected [h, w] or [h, w, 1]" in str(
        _refusal(packed(_fields(shape=shape)))
    )


@pytest.mark.parametrize("shape", [[0, 3], [2, 0], [0, 0, 1], [-1, 3], [-2, -3]])
def test_an_empty_or_negative_shape_is_refused(shape: list[int]) -> None:
    assert "is empty; expected h, w >= 1" in str(_refusal(packed(_fields(shape=shape, data=b""))))


def test_a_map_of_exactly_max_pixels_is_accepted_and_one_more_row_is_refused() -> None:
    at_limit = _fields(shape=[64, 64], data=bytes(64 * 64))
    assert _decode(packed(at_limit)).array.shape == (64, 64)
    error = _refusal(packed(_fields(shape=[65, 64], data=bytes(65 * 64))))
    assert f"has {65 * 64} pixels; expected at most {MAX_PIXELS}" in str(error)


@pytest.mark.parametrize("shape", [[100_000, 100_000], [2**32, 2**32, 1], [2**64 - 1, 2**64 - 1], [1, 2**63]])
def test_a_huge_declared_shape_is_refused_before_anything_is_allocated(shape: list[int]) -> None:
    payload = packed(_fields(shape=shape, data=b"\x00" * 16))
    tracemalloc.start()
    try:
        error = _refusal(payload, max_pixels=4096 * 4096, max_message_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "pixels; expected at most 16777216" in str(error)
    assert peak < 1 << 20


def test_a_shape_whose_size_overflows_int64_is_refused_even_under_a_huge_pixel_limit() -> None:
    # Given a limit that lets 2**80 pixels through, the byte count must still be exact.
    error = _refusal(packed(_fields(shape=[2**40, 2**40], data=b"")), max_pixels=2**100)
    assert f"needs {2**80}" in str(error)


@pytest.mark.parametrize(
    ("dtype", "itemsize"), [("uint8", 1), ("float16", 2), ("float32", 4), ("float64", 8)]
)
@pytest.mark.parametrize("delta", [-1, 1])
def test_data_of_the_wrong_length_for_shape_and_dtype_is_refused(
    dtype: str, itemsize: int, delta: int
) -> None:
    data = bytes(6 * itemsize + delta)
    error = _refusal(packed(_fields(dtype=dtype, data=data)))
    assert f"data is {len(data)} bytes; shape [2, 3] of {dtype} needs {6 * itemsize}" in str(error)


@pytest.mark.parametrize("dtype", ["int32", "<f4", "float128", "object", "", "UINT8", "uint8 "])
def test_an_unknown_dtype_is_refused_naming_it_and_the_known_ones(dtype: str) -> None:
    error = _refusal(packed(_fields(dtype=dtype)))
    assert f"map dtype is {dtype!r}; expected one of uint8, float16, float32, float64" in str(error)


@pytest.mark.parametrize("colormap", ["cividis", "JET", ""])
def test_an_unknown_colormap_is_refused_naming_it(colormap: str) -> None:
    error = _refusal(packed(_fields(colormap=colormap)))
    assert f"unknown colormap {colormap!r}; expected one of jet" in str(error)
    assert error.identity == ("run-1", "val/img-001", "cat")


@pytest.mark.parametrize("image_id", ["../x", "/etc/passwd", "a\x00b", "x" * 10_240])
def test_a_hostile_image_id_is_refused_and_still_reported_under_its_identity(image_id: str) -> None:
    error = _refusal(packed(_fields(id=image_id)), max_message_bytes=1 << 20)
    assert isinstance(error.__cause__, PermanentError)
    assert error.identity == ("run-1", image_id, "cat")


@pytest.mark.parametrize(
    ("changes", "identity"),
    [
        ({"dtype": "int32"}, ("run-1", "val/img-001", "cat")),
        ({"name": None, "shape": [2, 3, 3]}, ("run-1", "val/img-001", None)),
        ({"name": "bad name"}, ("run-1", "val/img-001", "bad name")),
        ({"run": 1}, None),
        ({"run": None}, None),
        ({"id": 1}, None),
        ({"id": None}, None),
        ({"name": 1}, None),
        ({"name": ["cat"]}, None),
    ],
)
def test_identity_is_carried_when_run_id_and_name_are_readable_and_none_otherwise(
    changes: dict[str, Any], identity: tuple[str, str, str | None] | None
) -> None:
    assert _refusal(packed(_fields(**changes))).identity == identity


def test_a_decoded_map_is_read_only_and_does_not_copy_the_data() -> None:
    array = _decode(packed(_fields())).array
    assert not array.flags.writeable
    assert array.tolist() == [[0, 1, 2], [3, 4, 5]]


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(database=None, deadline=None, max_examples=800)


def _decode_or_refuse(payload: bytes) -> None:
    """Decode; a refusal must be a MapDecodeError, and a success must match its declared shape."""
    try:
        message = _decode(payload)
    except MapDecodeError as exc:
        assert isinstance(exc, PermanentError)
        assert exc.identity is None or all(isinstance(part, str) for part in exc.identity[:2])
        return
    # A map message may also travel as a zlib stream (first byte 0x78).
    fields = msgpack.unpackb(zlib.decompress(payload) if payload[:1] == b"\x78" else payload, raw=False)
    assert message.array.shape == tuple(fields["shape"])
    assert message.array.dtype == np.dtype(fields["dtype"])
    assert message.array.size <= MAX_PIXELS
    assert message.array.tobytes() == fields["data"]


_VALID_MESSAGES = [
    packed(_fields()),
    packed(_fields(name=None, dtype="float16", shape=[3, 2, 1], data=np.ones(6, np.float16).tobytes())),
    packed(_fields(dtype="float64", shape=[1, 4], data=np.zeros(4).tobytes(), fade=False)),
]


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    payload = bytearray(draw(st.sampled_from(_VALID_MESSAGES)))
    if draw(st.integers(0, 3)) == 0:
        payload = bytearray(zlib.compress(bytes(payload)))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        index = draw(st.integers(0, max(len(payload) - 1, 0)))
        if operation == "flip" and payload:
            payload[index] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and payload:
            payload[index] = draw(
                st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCF, 0xD3, 0xDD, 0xDF, 0xFF])
            )
        elif operation == "truncate":
            del payload[index:]
        elif operation == "insert":
            payload[index:index] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del payload[index : index + draw(st.integers(1, 8))]
    return bytes(payload)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
_NESTED = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def valid_looking_fields(draw: st.DrawFn) -> dict[str, Any]:
    fields = _fields()
    ints = st.integers(-2, 8) | st.sampled_from([0, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]) | st.booleans()
    shape = draw(st.lists(ints, min_size=0, max_size=4) | st.just([2, 3]) | st.just([3, 2, 1]))
    dtype = draw(st.sampled_from([*DTYPES, "int32", "", "float128"]))
    fields.update(dtype=dtype, shape=shape)
    if all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 64 for n in shape) and dtype in DTYPES:
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        fields["data"] = draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size + 2))
    else:
        fields["data"] = draw(st.binary(max_size=32))
    for key in sorted(draw(st.sets(st.sampled_from(FIELDS), max_size=2))):
        if draw(st.sampled_from(["replace", "replace", "replace", "delete"])) == "replace":
            fields[key] = draw(_SCALARS | st.lists(_SCALARS, max_size=3))
        else:
            del fields[key]
    return fields


@FUZZ
@given(payload=st.binary(max_size=300) | st.binary(max_size=300).map(lambda tail: b"\x78" + tail))
def test_arbitrary_bytes_are_decoded_or_refused_with_a_map_decode_error(payload: bytes) -> None:
    _decode_or_refuse(payload)


@FUZZ
@given(payload=mutated_messages())
def test_mutated_valid_messages_are_decoded_or_refused_with_a_map_decode_error(payload: bytes) -> None:
    _decode_or_refuse(payload)


@FUZZ
@given(value=_NESTED, compressed=st.booleans())
def test_msgpack_of_arbitrary_nested_values_is_refused_with_a_map_decode_error(
    value: object, compressed: bool
) -> None:
    message = packed(value)
    _decode_or_refuse(zlib.compress(message) if compressed else message)


@FUZZ
@given(fields=valid_looking_fields())
def test_valid_looking_messages_with_random_fields_are_decoded_or_refused_cleanly(
    fields: dict[str, Any],
) -> None:
    _decode_or_refuse(packed(fields))


@settings(database=None, deadline=None, max_examples=200)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.tuples(st.integers(1, 64), st.integers(1, 64))
    | st.tuples(st.integers(1, 64), st.integers(1, 64), st.just(1)),
    name=st.none() | st.sampled_from(["cat", "c-1"]),
    fade=st.booleans(),
)
def test_every_valid_message_is_decoded_to_its_declared_shape(
    dtype: str, shape: tuple[int, ...], name: str | None, fade: bool
) -> None:
    array = _map(dtype, shape)
    decoded = _decode(encode_map(MapMessage("r", "a/b", name, array, "jet", fade)))
    assert decoded.array.shape == shape
    np.testing.assert_array_equal(decoded.array, array)
