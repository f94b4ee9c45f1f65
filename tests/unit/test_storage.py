"""worker.storage: the local folder store, and which store a storage URL opens (no server contacted)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from producer.errors import (
    ConfigError,
    InvalidImageIdError,
    StorageError,
    StorageRejectedError,
    TransientError,
)
from producer.keys import object_key
from producer.settings import Settings
from worker import storage as storage_module
from worker.storage import FileStorage, S3Storage, StoredObject, check_ca_bundle, open_storage

ROOT = Path(__file__).resolve().parents[2]

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ACTMAP_* or AWS_* variable of the calling shell; fake, offline AWS credentials."""
    for name in list(os.environ):
        if name.upper().startswith(("ACTMAP_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "maps"
    folder.mkdir()
    return folder


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def _uri_path(locator: str) -> Path:
    parts = urlsplit(locator)
    assert parts.scheme == "file"
    assert parts.netloc == ""
    return Path(unquote(parts.path))


# --- FileStorage ----------------------------------------------------------------------------


def test_put_writes_the_bytes_under_the_root_and_reports_a_file_uri_size_and_md5(root: Path) -> None:
    stored = FileStorage(root).put("prefix/val/img-001~cat.png", PNG)
    path = root / "prefix" / "val" / "img-001~cat.png"
    assert path.read_bytes() == PNG
    assert stored == StoredObject(path.as_uri(), len(PNG), f"md5:{hashlib.md5(PNG).hexdigest()}")
    assert stored.locator.startswith("file:///")
    assert _uri_path(stored.locator) == path


def test_the_locator_of_a_key_is_the_one_put_reports(root: Path) -> None:
    files = FileStorage(root)
    assert files.locator("a/b.png") == files.put("a/b.png", PNG).locator


def test_locators_lead_back_to_the_file_even_with_url_special_characters(tmp_path: Path) -> None:
    # Given a root and an id with characters a URL would misread (space, '%', '#', non-ASCII)...
    files = FileStorage(tmp_path / "C# 100%41")
    stored = files.put(object_key("p", "dir name/ünï 猫"), PNG)
    # ...the locator is a single well-formed file:// URI that decodes to the file written.
    assert " " not in stored.locator
    assert _uri_path(stored.locator).read_bytes() == PNG
    assert _uri_path(stored.locator) == tmp_path / "C# 100%41" / "p" / "dir name" / "ünï 猫.png"


def test_a_second_put_of_a_key_replaces_the_object_whole(root: Path) -> None:
    files = FileStorage(root)
    files.put("a.png", b"old contents that are longer than the new ones")
    stored = files.put("a.png", b"new")
    assert (root / "a.png").read_bytes() == b"new"
    assert stored.size == 3
    assert _files(root) == ["a.png"]


def test_the_object_appears_only_once_fully_written(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an older object at the key, while the new one is moved into place...
    files = FileStorage(root)
    files.put("a.png", b"old")
    seen: list[tuple[bytes, bytes]] = []
    real_replace = os.replace

    def checking_replace(source: Any, target: Any) -> None:
        seen.append((Path(source).read_bytes(), Path(target).read_bytes()))
        real_replace(source, target)

    monkeypatch.setattr(storage_module.os, "replace", checking_replace)
    files.put("a.png", PNG)
    # ...the new bytes were complete in a side file and readers still saw the old object.
    assert seen == [(PNG, b"old")]
    assert (root / "a.png").read_bytes() == PNG


def test_a_failed_write_leaves_the_previous_object_and_no_temporary_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = FileStorage(root)
    files.put("a.png", b"old")

    def full_disk(source: Any, target: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module.os, "replace", full_disk)
    with pytest.raises(StorageError, match=r"could not write .*a\.png.*No space left") as info:
        files.put("a.png", PNG)
    assert isinstance(info.value, TransientError)
    assert (root / "a.png").read_bytes() == b"old"
    assert _files(root) == ["a.png"]


def test_an_error_while_writing_removes_the_temporary_file(root: Path) -> None:
    with pytest.raises(TypeError):
        FileStorage(root).put("a/b.png", "not bytes")  # type: ignore[arg-type]
    assert _files(root) == []


def test_a_file_in_the_way_of_a_folder_is_refused_for_good_not_retried(root: Path) -> None:
    # ids "a.png" then "a.png/b": valid both, and S3 would store both
    FileStorage(root).put("a.png", PNG)
    with pytest.raises(StorageRejectedError, match=r"could not write .*a retry cannot change that"):
        FileStorage(root).put("a.png/b.png", PNG)
    assert _files(root) == ["a.png"]


def test_a_folder_in_the_way_of_a_file_is_refused_for_good_not_retried(root: Path) -> None:
    FileStorage(root).put("b.png/c.png", PNG)
    with pytest.raises(StorageRejectedError, match=r"Is a directory.*a retry cannot change that"):
        FileStorage(root).put("b.png", PNG)
    assert _files(root) == ["b.png/c.png"]


def test_a_name_as_long_as_a_key_may_be_is_written_though_its_temporary_name_is_longer(root: Path) -> None:
    # a 200-byte id and a map name: a 253-byte file name; ".<name>.<pid>-<thread>.tmp" is over 255
    key = object_key("", "i" * 200, "n" * 48)
    FileStorage(root).put(key, PNG)
    assert (root / key).read_bytes() == PNG
    assert _files(root) == [key]
    # and the temporary name it used is one the sweep knows
    assert storage_module._TEMPORARY.fullmatch(storage_module._temporary_name(key))
    assert len(storage_module._temporary_name(key).encode()) <= 255


@pytest.mark.parametrize("key", ["../x.png", "a/../../x.png", "/etc/passwd", "/tmp/x.png", "", ".", "a/.."])
def test_a_key_that_resolves_outside_or_onto_the_root_is_refused(
    tmp_path: Path, root: Path, key: str
) -> None:
    files = FileStorage(root)
    with pytest.raises(InvalidImageIdError, match="resolves outside"):
        files.put(key, PNG)
    with pytest.raises(InvalidImageIdError):
        files.locator(key)
    assert _files(tmp_path) == []


def test_a_link_inside_the_root_cannot_carry_a_write_outside_it(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidImageIdError, match="resolves outside"):
        FileStorage(root).put("link/x.png", PNG)
    assert list(outside.iterdir()) == []


def test_a_link_in_place_of_a_map_is_replaced_by_the_map_not_followed(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not to be overwritten")
    (root / "a.png").symlink_to(outside)
    FileStorage(root).put("a.png", PNG)
    assert outside.read_bytes() == b"not to be overwritten"
    assert not (root / "a.png").is_symlink()
    assert (root / "a.png").read_bytes() == PNG


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"not to be overwritten")
    # The temporary name of this process and thread (see FileStorage.put).
    (root / f".a.png.{os.getpid()}-{threading.get_ident()}.tmp").symlink_to(outside)
    with pytest.raises(StorageError, match="could not write"):
        FileStorage(root).put("a.png", PNG)
    assert outside.read_bytes() == b"not to be overwritten"
    assert not (root / "a.png").exists()


@pytest.mark.parametrize(
    "key",
    [
        "x" * 300 + ".png",  # a file name over 255 bytes
        "d" * 300 + "/x.png",  # a folder name over 255 bytes
        "/".join(["d" * 200] * 25) + "/x.png",  # a path over PATH_MAX
    ],
)
def test_a_name_too_long_for_the_file_system_is_an_invalid_id_not_a_retry(root: Path, key: str) -> None:
    with pytest.raises(InvalidImageIdError, match="too long") as info:
        FileStorage(root).put(key, PNG)
    assert str(root) in str(info.value)
    assert _files(root) == []


def test_a_root_under_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    stored = FileStorage(Path("~/maps")).put("a.png", PNG)
    assert (tmp_path / "user" / "maps" / "a.png").read_bytes() == PNG
    assert _uri_path(stored.locator) == (tmp_path / "user" / "maps" / "a.png").resolve()


# --- open_storage ---------------------------------------------------------------------------


def _open(**settings: Any) -> storage_module.StorageLocation:
    return open_storage(Settings(**settings))


def test_by_default_maps_go_to_the_maps_folder_of_home_with_no_prefix(tmp_path: Path) -> None:
    location = _open(home=tmp_path / "C# home?")
    assert isinstance(location.storage, FileStorage)
    assert location.storage.root == tmp_path / "C# home?" / "maps"
    assert location.prefix == ""


@pytest.mark.parametrize(
    ("url", "folder"),
    [
        ("file:///srv/actmap/maps", "/srv/actmap/maps"),
        ("file://localhost/srv/maps", "/srv/maps"),
        ("file:///srv/two%20words/maps", "/srv/two words/maps"),
        ("file:///srv/maps/", "/srv/maps"),
    ],
)
def test_a_file_url_opens_that_folder_with_no_prefix(url: str, folder: str) -> None:
    location = _open(storage_url=url)
    assert isinstance(location.storage, FileStorage)
    assert location.storage.root == Path(folder)
    assert location.prefix == ""


def test_a_file_url_naming_another_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="names host 'fileserver'; expected file:///absolute/dir"):
        _open(storage_url="file://fileserver/maps")


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://maps-bucket/cams/run-1", "maps-bucket", "cams/run-1"),
        ("s3://maps-bucket/cams/", "maps-bucket", "cams"),
        ("s3://maps-bucket", "maps-bucket", ""),
        ("s3://maps-bucket/", "maps-bucket", ""),
    ],
)
def test_an_s3_url_opens_its_bucket_with_the_path_as_key_prefix(url: str, bucket: str, prefix: str) -> None:
    location = _open(storage_url=url)
    assert isinstance(location.storage, S3Storage)
    assert location.storage.bucket == bucket
    assert location.prefix == prefix
    key = object_key(location.prefix, "val/img-001", "cat")
    assert location.storage.locator(key) == f"s3://{bucket}/{key}"
    assert location.storage.locator(key).endswith("/val/img-001~cat.png")


def test_the_s3_client_uses_the_configured_endpoint_region_attempts_and_encryption() -> None:
    location = _open(
        storage_url="s3://b/p",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_region="eu-west-3",
        storage_max_attempts=2,
        s3_server_side_encryption="AES256",
    )
    assert isinstance(location.storage, S3Storage)
    client = location.storage.client
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert location.storage.server_side_encryption == "AES256"


def test_without_an_endpoint_the_s3_client_talks_to_aws() -> None:
    location = _open(storage_url="s3://b/p")
    assert isinstance(location.storage, S3Storage)
    assert "amazonaws.com" in location.storage.client.meta.endpoint_url
    assert location.storage.server_side_encryption is None


@pytest.mark.parametrize(
    ("content", "says"),
    [(None, "cannot read the CA bundle"), (b"not a certificate\n", "holds no PEM certificate (18 bytes)")],
    ids=["missing", "not-pem"],
)
def test_a_ca_bundle_the_s3_clients_cannot_use_is_refused_as_the_worker_starts_naming_it(
    content: bytes | None, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    for client in ("boto3", "obstore"):
        settings = Settings(storage_url="s3://b/p", s3_client=client, s3_endpoint_url="https://127.0.0.1:9")
        with pytest.raises(ConfigError) as info:
            check_ca_bundle(settings)
        assert says in str(info.value) and str(bundle) in str(info.value), info.value
        assert "AWS_CA_BUNDLE" in str(info.value)
    check_ca_bundle(Settings(storage_url=f"file://{tmp_path}"))  # a folder needs no CA


def test_a_ca_bundle_from_the_aws_config_file_is_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aws-config"
    config.write_text(f"[default]\nca_bundle = {tmp_path / 'absent.pem'}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with pytest.raises(ConfigError, match=r"absent\.pem"):
        check_ca_bundle(Settings(storage_url="s3://b/p"))


def test_an_s3_url_without_a_bucket_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no bucket; expected s3://bucket/prefix"):
        _open(storage_url="s3:///prefix")


@pytest.mark.parametrize(
    ("url", "scheme"),
    [("gs://bucket/p", "gs"), ("http://host/maps", "http"), ("/srv/maps", ""), ("S4://b/p", "s4")],
)
def test_a_storage_url_of_an_unknown_scheme_is_refused_naming_it(url: str, scheme: str) -> None:
    with pytest.raises(ConfigError) as info:
        _open(storage_url=url)
    assert f"has scheme {scheme!r}; expected s3://bucket/prefix or file:///dir" in str(info.value)


@pytest.mark.parametrize("opener", [lambda: _open(storage_url="file:///srv/maps"), lambda: _open()])
def test_opening_a_file_store_creates_nothing_until_a_put(
    tmp_path: Path, opener: Callable[[], object]
) -> None:
    opener()
    assert list(tmp_path.iterdir()) == []


def test_a_stored_png_is_readable_by_others_as_any_new_file_is(tmp_path: Path) -> None:
    stored = FileStorage(tmp_path).put("shared/map.png", PNG)
    mode = (tmp_path / "shared" / "map.png").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert stored.size == len(PNG)


def test_a_folder_removed_after_a_first_write_is_made_again(tmp_path: Path) -> None:
    files = FileStorage(tmp_path)
    files.put("gone/a.png", PNG)
    shutil.rmtree(tmp_path / "gone")
    files.put("gone/b.png", PNG)
    assert (tmp_path / "gone" / "b.png").read_bytes() == PNG


def test_the_obstore_client_without_obstore_installed_is_a_config_error_naming_the_extra() -> None:
    # A process where obstore cannot be imported, as on a worker installed without the extra.
    probe = (
        "import sys\nsys.modules['obstore'] = None\n"
        "from producer.settings import Settings\nfrom worker.storage import open_storage\n"
        "from producer.errors import ConfigError\n"
        "try:\n    open_storage(Settings(storage_url='s3://bucket/maps', s3_client='obstore'))\n"
        "except ConfigError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.startswith("ACTMAP_S3_CLIENT=obstore, but obstore is not installed"), out
    assert "pip install 'actmap[obstore]'" in out.stdout
