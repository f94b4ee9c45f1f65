"""Names derived from an image id: the object key of its PNG and the id of its result.

Both are pure functions of their inputs, so a retried or duplicated task writes the same
object and the same result (at-least-once delivery, exactly-once effect).

Image ids are path-like (``val/img-001``) and become object keys under the storage prefix,
so anything that could leave the prefix or confuse a file system or a URL is refused.
Map names are short identifiers; a named map is stored as ``<image_id>~<name>.png``, and
``~`` is allowed in neither, so no two (image id, name) pairs share a key.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

from producer.errors import InvalidImageIdError, InvalidMapNameError

MAX_IMAGE_ID_BYTES = 512
# A file system refuses names over 255 bytes; leave room for "~<name>.png".
MAX_SEGMENT_BYTES = 200
MAX_MAP_NAME_CHARS = 48
NAME_SEPARATOR = "~"
PNG_SUFFIX = ".png"

_MAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Backslash is a separator on Windows; '#' and '?' would cut a locator URL short, and a
# client that unquotes a locator would read '%2e%2e' as '..'.
_FORBIDDEN_CHARS = frozenset("\\#?%" + NAME_SEPARATOR)
# Control, format (e.g. bidi overrides, zero-width), surrogate, private and unassigned
# code points, and line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


# The usual id (ASCII, segments not starting with a dot, short) passes in one C call; any
# other goes through the character-by-character checks below, which accept or refuse it.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def validate_image_id(image_id: object) -> str:
    """Return ``image_id`` if it can be a key inside the prefix; raise InvalidImageIdError if not."""
    if type(image_id) is str and len(image_id) <= MAX_SEGMENT_BYTES and _PLAIN_ID.fullmatch(image_id):
        return image_id
    if not isinstance(image_id, str):
        raise InvalidImageIdError(f"image id must be a str, received {type(image_id).__name__}")
    shown = _shorten(image_id)
    if not image_id:
        raise InvalidImageIdError("image id is empty; expected a relative path like 'val/img-001'")
    size = len(image_id.encode("utf-8", "surrogatepass"))
    if size > MAX_IMAGE_ID_BYTES:
        raise InvalidImageIdError(f"image id {shown} is {size} bytes; expected at most {MAX_IMAGE_ID_BYTES}")
    for char in image_id:
        if char in _FORBIDDEN_CHARS or unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise InvalidImageIdError(
                f"image id {shown} contains {char!r} (U+{ord(char):04X}); expected no control, "
                f"format or separator characters and none of {''.join(sorted(_FORBIDDEN_CHARS))!r}"
            )
    if image_id.startswith("/"):
        raise InvalidImageIdError(f"image id {shown} is an absolute path; expected a relative one")
    for segment in image_id.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidImageIdError(
                f"image id {shown} has a {segment or 'empty'!r} path segment; "
                "expected segments that stay inside the prefix"
            )
        if segment != segment.strip():
            raise InvalidImageIdError(
                f"image id {shown} has a segment with leading or trailing white space; expected none"
            )
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise InvalidImageIdError(
                f"image id {shown} has a path segment over {MAX_SEGMENT_BYTES} bytes; expected shorter ones"
            )
    return image_id


def validate_map_name(name: object) -> str | None:
    """Return ``name`` (None for the image's only map) if it is a valid map name."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise InvalidMapNameError(f"map name must be a str or None, received {type(name).__name__}")
    if len(name) > MAX_MAP_NAME_CHARS or not _MAP_NAME.fullmatch(name):
        raise InvalidMapNameError(
            f"map name {_shorten(name)} is not valid; expected 1 to {MAX_MAP_NAME_CHARS} characters "
            "of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def object_key(prefix: str, image_id: str, name: str | None = None) -> str:
    """The key of a map's PNG: ``<prefix>/<image_id>[~<name>].png``."""
    validate_image_id(image_id)
    validate_map_name(name)
    stem = image_id if name is None else f"{image_id}{NAME_SEPARATOR}{name}"
    prefix = prefix.strip("/")
    return f"{prefix}/{stem}{PNG_SUFFIX}" if prefix else f"{stem}{PNG_SUFFIX}"


def result_id(run_id: str, image_id: str, name: str | None = None) -> str:
    """The result backend id of one map of one run: hashed, so safe as a Redis key and a file name.

    The hash is of an unambiguous encoding (a JSON list), so no two triples share an id
    whatever characters a decoded message carries.
    """
    text = json.dumps([run_id, image_id, name])
    return f"actmap-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}"


def _shorten(text: str, limit: int = 80) -> str:
    shown = text if len(text) <= limit else f"{text[:limit]}…"
    return repr(shown) + (f" ({len(text)} chars)" if len(text) > limit else "")
