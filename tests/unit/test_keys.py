"""producer.keys: which image ids and map names become object keys, and what those keys look like."""

from __future__ import annotations

import posixpath
import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.errors import InvalidImageIdError, InvalidMapNameError
from producer.keys import (
    MAX_IMAGE_ID_BYTES,
    MAX_MAP_NAME_CHARS,
    MAX_SEGMENT_BYTES,
    object_key,
    result_id,
    validate_image_id,
    validate_map_name,
)

PREFIX = "prefix"
_RESULT_ID = re.compile(r"actmap-[0-9a-f]{40}")

# Segments chosen to hit every rule: traversal, empty segments, encodings and look-alikes of
# separators, control and format characters, white space, the name separator, long runs.
HOSTILE_SEGMENTS = [
    "..",
    ".",
    "",
    "a",
    "b",
    "%2e%2e",
    "%2f",
    "\\",
    "..\\",
    "\u2215",  # DIVISION SLASH
    "\uff0f",  # FULLWIDTH SOLIDUS
    "\u2024\u2024",  # ONE DOT LEADER twice: looks like '..'
    "\x00",
    "\n",
    "\x7f",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u200b",  # ZERO WIDTH SPACE
    "\u2028",  # LINE SEPARATOR
    "\ud800",  # a lone surrogate
    " ",
    "\u3000",  # IDEOGRAPHIC SPACE
    "~",
    "#",
    "?",
    "img-001.png",
    "x" * 199,
    "x" * 201,
    "é" * 101,
]
SAFE_SEGMENTS = st.text(
    alphabet=st.characters(categories=("L", "N"), include_characters="-_.()+,=@ "),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip() == s and s not in (".", ".."))
# Mostly "/" and ordinary segments, so that many ids are valid and their keys get checked.
_SEPARATORS = ["//", "\\", "\u2215", ""]


@st.composite
def segment_ids(draw: st.DrawFn) -> str:
    count = draw(st.integers(1, 6))
    text = draw(st.sampled_from(["/", "./", "../"])) if draw(st.integers(0, 9)) == 0 else ""
    for index in range(count):
        if index:
            text += draw(st.sampled_from(_SEPARATORS)) if draw(st.integers(0, 9)) == 0 else "/"
        kind = draw(st.integers(0, 11))
        if kind == 0:
            text += draw(st.sampled_from(HOSTILE_SEGMENTS))
        elif kind == 1:
            text += draw(st.text(st.characters(), max_size=4))
        else:
            text += draw(SAFE_SEGMENTS)
    return text


ANY_IDS = (
    st.text(alphabet=st.characters(), max_size=40)
    | st.text(alphabet=st.characters(), min_size=500, max_size=700)
    | segment_ids()
    | segment_ids()
    | segment_ids()
)
ANY_NAMES = (
    st.none()
    | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)
    | st.sampled_from(["cat", "a.b", "x~y", "", ".hidden", "a/b", "é", "9_lives-2", "n" * 48, "n" * 49])
    | st.text(alphabet=st.characters(), max_size=10)
)
VALID_IDS = st.lists(SAFE_SEGMENTS, min_size=1, max_size=5).map("/".join)
VALID_NAMES = st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}", fullmatch=True)


# What object_key raises for an id or a name that cannot be part of a key.
INVALID_KEY = (InvalidImageIdError, InvalidMapNameError)


def _refusal(image_id: object, name: object = None) -> str:
    """The message object_key refuses with: InvalidMapNameError for a bad name, else InvalidImageIdError."""
    expected = InvalidImageIdError if name is None else InvalidMapNameError
    with pytest.raises(expected) as info:
        object_key(PREFIX, image_id, name)  # type: ignore[arg-type]
    return str(info.value)


# --- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_id", "name", "key"),
    [
        ("val/img-001", None, "prefix/val/img-001.png"),
        ("val/img-001", "cat", "prefix/val/img-001~cat.png"),
        ("a", "class_3.v-2", "prefix/a~class_3.v-2.png"),
        ("img.png", None, "prefix/img.png.png"),
        ("dir with space/ünïcödé 猫", None, "prefix/dir with space/ünïcödé 猫.png"),
        ("...", None, "prefix/....png"),
        ("a..b/.c", None, "prefix/a..b/.c.png"),
    ],
)
def test_valid_ids_become_a_key_of_prefix_id_optional_name_and_png_suffix(
    image_id: str, name: str | None, key: str
) -> None:
    assert object_key(PREFIX, image_id, name) == key


@pytest.mark.parametrize(("prefix", "key"), [("", "a.png"), ("/", "a.png"), ("/p/q/", "p/q/a.png")])
def test_the_prefix_loses_its_outer_slashes_and_an_empty_prefix_gives_a_bare_key(
    prefix: str, key: str
) -> None:
    assert object_key(prefix, "a") == key


@pytest.mark.parametrize(
    "image_id",
    [
        "../x",
        "/etc/passwd",
        "a/../../b",
        "a\x00b",
        "a\nb",
        "x" * 10_240,
        "a\\..\\b",
        "..",
        ".",
        "",
        "./a",
        "a/.",
        "a/",
        "a//b",
        "//a",
        " a",
        "a/b ",
        "a/\u3000b",
        "a\rb",
        "a\tb",
        "a\x7fb",
        "a\u202eb",
        "a\u200bb",
        "a\u2028b",
        "a\ufeffb",
        "a\ud800b",
        "a#b",
        "a?b",
        "a~b",
        "x" * (MAX_SEGMENT_BYTES + 1),
        "é" * (MAX_SEGMENT_BYTES // 2 + 1),
    ],
)
def test_ids_that_could_leave_the_prefix_or_confuse_a_path_or_url_are_refused(image_id: str) -> None:
    with pytest.raises(InvalidImageIdError):
        validate_image_id(image_id)
    _refusal(image_id)


@pytest.mark.parametrize("image_id", [None, 7, b"val/img", ["a"], 1.5])
def test_an_id_that_is_not_a_str_is_refused_naming_its_type(image_id: object) -> None:
    message = _refusal(image_id)
    assert "must be a str" in message
    assert type(image_id).__name__ in message


def test_a_traversal_refusal_names_the_id_and_the_segment_and_what_is_expected() -> None:
    message = _refusal("a/../../b")
    assert "'a/../../b'" in message
    assert "'..'" in message
    assert "expected" in message


def test_an_absolute_id_refusal_says_a_relative_one_is_expected() -> None:
    message = _refusal("/etc/passwd")
    assert "'/etc/passwd'" in message
    assert "absolute" in message
    assert "expected a relative" in message


def test_a_control_character_refusal_names_the_character_and_its_code_point() -> None:
    message = _refusal("a\x00b")
    assert "'\\x00'" in message
    assert "U+0000" in message
    assert "expected no control" in message


def test_a_ten_kilobyte_id_is_refused_with_its_size_and_the_limit_in_a_short_message() -> None:
    message = _refusal("x" * 10_240)
    assert "10240 bytes" in message
    assert f"at most {MAX_IMAGE_ID_BYTES}" in message
    # Given a huge id, the message shows a prefix of it, not all of it.
    assert len(message) < 300


def test_an_empty_id_refusal_shows_what_an_id_looks_like() -> None:
    message = _refusal("")
    assert "empty" in message
    assert "expected" in message


def test_the_id_size_limit_counts_utf8_bytes_and_is_inclusive() -> None:
    segment = "é" * (MAX_SEGMENT_BYTES // 2)  # exactly MAX_SEGMENT_BYTES bytes
    assert validate_image_id(segment) == segment
    # Given segments that together reach the id limit exactly, the id is accepted...
    parts = ["x" * 127] * 4
    at_limit = "/".join(parts)[: MAX_IMAGE_ID_BYTES - 1] + "y"
    assert len(at_limit.encode()) == MAX_IMAGE_ID_BYTES
    assert validate_image_id(at_limit) == at_limit
    # ...and one byte more is refused.
    with pytest.raises(InvalidImageIdError, match=f"{MAX_IMAGE_ID_BYTES + 1} bytes"):
        validate_image_id(at_limit + "z")


def test_the_longest_segment_with_the_longest_name_still_fits_a_file_system_name() -> None:
    key = object_key(PREFIX, "s" * MAX_SEGMENT_BYTES, "n" * MAX_MAP_NAME_CHARS)
    assert len(key.rsplit("/", 1)[1].encode()) <= 255


@pytest.mark.parametrize("name", ["cat", "9", "class_3", "a.b-c", "A" * MAX_MAP_NAME_CHARS])
def test_valid_map_names_are_returned_unchanged(name: str) -> None:
    assert validate_map_name(name) == name


def test_no_map_name_means_the_images_only_map() -> None:
    assert validate_map_name(None) is None
    assert object_key(PREFIX, "a", None) == object_key(PREFIX, "a")


@pytest.mark.parametrize(
    "name", ["", "-a", ".a", "_a", "a/b", "a~b", "a b", "é", "a\n", "..", "A" * (MAX_MAP_NAME_CHARS + 1)]
)
def test_invalid_map_names_are_refused_saying_what_is_expected(name: str) -> None:
    message = _refusal("a", name)
    assert repr(name[:80]) in message
    assert f"1 to {MAX_MAP_NAME_CHARS} characters" in message


@pytest.mark.parametrize("name", [3, b"cat", ["cat"], True])
def test_a_map_name_that_is_neither_str_nor_none_is_refused_naming_its_type(name: object) -> None:
    message = _refusal("a", name)
    assert "str or None" in message
    assert type(name).__name__ in message


# --- properties of object keys --------------------------------------------------------------


def _assert_safe_key(key: str) -> None:
    assert key.startswith(f"{PREFIX}/")
    normalized = posixpath.normpath(key)
    assert normalized == key
    assert normalized.startswith(f"{PREFIX}/")
    assert "//" not in key
    assert not {".", ".."} & set(key.split("/"))
    assert not any(unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") for char in key)
    assert "\\" not in key


@settings(database=None, deadline=None, max_examples=1000)
@given(image_id=ANY_IDS, name=ANY_NAMES)
def test_any_id_either_is_refused_or_gives_a_key_that_stays_inside_the_prefix(
    image_id: str, name: str | None
) -> None:
    # Given any text at all, when a key is asked for, then only an id or name refusal can come out...
    try:
        key = object_key(PREFIX, image_id, name)
    except INVALID_KEY:
        return
    # ...and a key that does come out cannot leave the prefix, be re-normalized or carry controls.
    _assert_safe_key(key)


@settings(database=None, deadline=None, max_examples=150)
@given(image_id=VALID_IDS, name=VALID_NAMES)
def test_every_relative_id_of_ordinary_segments_is_accepted_as_is(image_id: str, name: str | None) -> None:
    assert validate_image_id(image_id) == image_id
    key = object_key(PREFIX, image_id, name)
    _assert_safe_key(key)
    assert key == f"{PREFIX}/{image_id}{'' if name is None else '~' + name}.png"


@settings(database=None, deadline=None, max_examples=500)
@given(image_id=ANY_IDS | VALID_IDS, name=ANY_NAMES | VALID_NAMES)
def test_the_id_and_name_can_be_read_back_from_any_key(image_id: str, name: str | None) -> None:
    # A key from which (id, name) can be recovered cannot be shared by two different pairs.
    try:
        key = object_key(PREFIX, image_id, name)
    except INVALID_KEY:
        return
    stem = key.removeprefix(f"{PREFIX}/").removesuffix(".png")
    recovered_id, _, recovered_name = stem.partition("~")
    assert (recovered_id, recovered_name or None) == (image_id, name)


# Few spellings, so that different pairs often spell the same text: ("a~b", None) vs ("a", "b").
_TINY_IDS = st.lists(st.sampled_from(["a", "b", "a.png", "png", "a~b", "."]), min_size=1, max_size=2).map(
    "/".join
)
_TINY_NAMES = st.sampled_from([None, None, "a", "b", "png", "a.png", "b~a"])


@settings(database=None, deadline=None, max_examples=800)
@given(first=st.tuples(_TINY_IDS, _TINY_NAMES), second=st.tuples(_TINY_IDS, _TINY_NAMES))
def test_two_different_id_and_name_pairs_never_share_a_key(
    first: tuple[str, str | None], second: tuple[str, str | None]
) -> None:
    try:
        keys = object_key(PREFIX, *first), object_key(PREFIX, *second)
    except INVALID_KEY:
        return
    assert (keys[0] == keys[1]) == (first == second)


def test_pairs_that_spell_the_same_text_get_different_keys_or_are_refused() -> None:
    assert object_key(PREFIX, "a", "b") != object_key(PREFIX, "a.png", None)
    assert object_key(PREFIX, "a", "b.png") == "prefix/a~b.png.png"
    with pytest.raises(InvalidImageIdError):
        object_key(PREFIX, "a~b")  # would be the key of ("a", "b")


# --- result ids -----------------------------------------------------------------------------


def test_a_result_id_is_stable_across_calls_and_releases() -> None:
    # Producers and workers of different releases must agree on it: this value is pinned.
    assert result_id("run-1", "val/img-001", "cat") == result_id("run-1", "val/img-001", "cat")
    assert result_id("run-1", "val/img-001", "cat") == "actmap-79913117cd6214760c49971254c009d003f3b613"
    assert result_id("run-1", "val/img-001") == "actmap-290cf11d4e45669a42177e0f8bcca2e6888333d9"


def test_result_ids_differ_by_run_by_image_and_by_name() -> None:
    ids = {
        result_id("r", "a"),
        result_id("r", "a", "cat"),
        result_id("r", "a", "dog"),
        result_id("r", "b"),
        result_id("r2", "a"),
    }
    assert len(ids) == 5


def test_no_name_and_an_empty_name_get_different_result_ids() -> None:
    # An empty name is never valid; a message carrying one must not report under the unnamed map.
    assert result_id("r", "a", "") != result_id("r", "a", None)


def test_result_ids_do_not_depend_on_how_nul_characters_split_the_parts() -> None:
    assert result_id("r\0a", "b") != result_id("r", "a\0b")
    assert result_id("r", "a\0b", None) != result_id("r", "a", "b")


_PARTS = st.text(alphabet="ab\0", max_size=4)


@settings(database=None, deadline=None, max_examples=600)
@given(
    first=st.tuples(_PARTS, _PARTS, st.none() | _PARTS),
    second=st.tuples(_PARTS, _PARTS, st.none() | _PARTS),
)
def test_different_run_image_and_name_triples_never_share_a_result_id(
    first: tuple[str, str, str | None], second: tuple[str, str, str | None]
) -> None:
    assert (result_id(*first) == result_id(*second)) == (first == second)


@settings(database=None, deadline=None, max_examples=300)
@given(run=st.text(), image_id=ANY_IDS, name=st.none() | st.text())
def test_a_result_id_is_always_a_short_safe_key(run: str, image_id: str, name: str | None) -> None:
    assert _RESULT_ID.fullmatch(result_id(run, image_id, name))


def test_a_result_id_of_a_lone_surrogate_is_still_a_safe_key() -> None:
    assert _RESULT_ID.fullmatch(result_id("r", "a\ud800"))
