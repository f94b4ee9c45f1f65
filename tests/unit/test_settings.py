"""producer.settings: the ACTMAP_* environment, the embedded defaults, and the page generated from them."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from pydantic import ValidationError

from producer.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No ACTMAP_* variable of the calling shell, and a fresh working directory for the default home."""
    for name in list(os.environ):
        if name.upper().startswith("ACTMAP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    assert parts.scheme == "file"
    assert (parts.query, parts.fragment) == ("", "")
    return Path(unquote(parts.path))


# --- settings: embedded defaults ------------------------------------------------------------


def test_with_no_environment_everything_lives_under_dot_actmap_in_the_working_directory(
    tmp_path: Path,
) -> None:
    settings = Settings()
    home = tmp_path.resolve() / ".actmap"
    assert settings.home == Path(".actmap")
    assert settings.resolved_home == home
    assert settings.effective_broker_url == "filesystem://"
    assert settings.uses_filesystem_broker()
    assert settings.broker_folder == home / "broker"
    assert settings.effective_result_backend == f"file://{home / 'results'}"
    assert _file_url_path(settings.effective_storage_url) == home / "maps"
    assert settings.s3_endpoint_url is None
    assert settings.queue == "actmap"


def test_actmap_home_moves_every_embedded_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACTMAP_HOME", str(tmp_path / "elsewhere"))
    settings = Settings()
    assert settings.resolved_home == tmp_path.resolve() / "elsewhere"
    assert settings.broker_folder == tmp_path.resolve() / "elsewhere" / "broker"
    assert settings.effective_result_backend == f"file://{tmp_path.resolve() / 'elsewhere' / 'results'}"
    assert _file_url_path(settings.effective_storage_url) == tmp_path.resolve() / "elsewhere" / "maps"


def test_a_home_under_tilde_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("ACTMAP_HOME", "~/.actmap")
    assert Settings().resolved_home == (tmp_path / "user").resolve() / ".actmap"


@pytest.mark.parametrize("folder", ["C# projects", "50%41 done", "what?", "a b", "100%"])
def test_the_default_storage_url_names_the_home_exactly_whatever_its_characters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, folder: str
) -> None:
    # Given a home whose name has URL-special characters, the file:// URL must still lead back to it.
    monkeypatch.setenv("ACTMAP_HOME", str(tmp_path / folder))
    assert _file_url_path(Settings().effective_storage_url) == tmp_path.resolve() / folder / "maps"


# --- settings: environment ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("ACTMAP_BROKER_URL", "redis://h:6379/0", "broker_url", "redis://h:6379/0"),
        ("ACTMAP_RESULT_BACKEND", "redis://h:6379/1", "result_backend", "redis://h:6379/1"),
        ("ACTMAP_STORAGE_URL", "s3://bucket/prefix", "storage_url", "s3://bucket/prefix"),
        ("ACTMAP_S3_ENDPOINT_URL", "http://127.0.0.1:8333", "s3_endpoint_url", "http://127.0.0.1:8333"),
        ("ACTMAP_S3_REGION", "eu-west-3", "s3_region", "eu-west-3"),
        ("ACTMAP_S3_SERVER_SIDE_ENCRYPTION", "AES256", "s3_server_side_encryption", "AES256"),
        ("ACTMAP_QUEUE", "maps-gpu0", "queue", "maps-gpu0"),
        ("ACTMAP_RESULT_EXPIRES_S", "3600", "result_expires_s", 3600),
        ("ACTMAP_BATCH_SIZE", "7", "batch_size", 7),
        ("ACTMAP_BACKGROUND_PUBLISH", "false", "background_publish", False),
        ("ACTMAP_BACKGROUND_PUBLISH", "1", "background_publish", True),
        ("ACTMAP_REDELIVER_BUFFER_MB", "0", "redeliver_buffer_mb", 0),
        ("ACTMAP_PUBLISH_TIMEOUT_S", "2.5", "publish_timeout_s", 2.5),
        ("ACTMAP_MAX_PIXELS", "1000", "max_pixels", 1000),
        ("ACTMAP_MAX_MESSAGE_BYTES", "2048", "max_message_bytes", 2048),
        ("ACTMAP_PNG_COMPRESS_LEVEL", "0", "png_compress_level", 0),
        ("ACTMAP_STORAGE_MAX_ATTEMPTS", "2", "storage_max_attempts", 2),
        ("ACTMAP_TASK_MAX_RETRIES", "0", "task_max_retries", 0),
        ("ACTMAP_RETRY_BACKOFF_MAX_S", "3", "retry_backoff_max_s", 3),
        ("ACTMAP_HOME", "/srv/actmap", "home", Path("/srv/actmap")),
        ("actmap_queue", "lower-case-too", "queue", "lower-case-too"),
    ],
)
def test_each_setting_is_read_from_its_actmap_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: Any
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(Settings(), field) == expected


def test_configured_urls_replace_the_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTMAP_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("ACTMAP_RESULT_BACKEND", "redis://h:6379/1")
    monkeypatch.setenv("ACTMAP_STORAGE_URL", "s3://bucket/prefix")
    settings = Settings()
    assert settings.effective_broker_url == "redis://h:6379/0"
    assert not settings.uses_filesystem_broker()
    assert settings.effective_result_backend == "redis://h:6379/1"
    assert settings.effective_storage_url == "s3://bucket/prefix"


def test_keyword_arguments_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI passes its flags this way.
    monkeypatch.setenv("ACTMAP_QUEUE", "from-env")
    monkeypatch.setenv("ACTMAP_BATCH_SIZE", "8")
    settings = Settings(queue="from-flag")
    assert (settings.queue, settings.batch_size) == ("from-flag", 8)


def test_unknown_actmap_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTMAP_NO_SUCH_SETTING", "1")
    assert Settings().queue == "actmap"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ACTMAP_BATCH_SIZE", "0"),
        ("ACTMAP_BATCH_SIZE", "5000"),
        ("ACTMAP_BATCH_SIZE", "many"),
        ("ACTMAP_PNG_COMPRESS_LEVEL", "10"),
        ("ACTMAP_PNG_COMPRESS_LEVEL", "4"),
        ("ACTMAP_MAX_MESSAGE_BYTES", "100"),
        ("ACTMAP_MAX_PIXELS", "0"),
        ("ACTMAP_RESULT_EXPIRES_S", "59"),
        ("ACTMAP_PUBLISH_TIMEOUT_S", "0"),
        ("ACTMAP_STORAGE_MAX_ATTEMPTS", "0"),
        ("ACTMAP_TASK_MAX_RETRIES", "-1"),
        ("ACTMAP_BACKGROUND_PUBLISH", "perhaps"),
        ("ACTMAP_REDELIVER_BUFFER_MB", "-1"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert variable.removeprefix("ACTMAP_").lower() in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ACTMAP_PNG_COMPRESS_LEVEL", "4", "expected an ISA-L level, an int from 0 to 3; received '4'"),
        ("ACTMAP_PNG_COMPRESS_LEVEL", "-1", "expected an ISA-L level, an int from 0 to 3; received '-1'"),
        ("ACTMAP_PNG_COMPRESS_LEVEL", "fast", "expected an ISA-L level, an int from 0 to 3; received 'fast'"),
    ],
)
def test_a_compress_level_outside_isals_0_to_3_is_refused_naming_the_range(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    # zlib's levels are 0-9 and ISA-L's 0-3: a zlib level such as 6 must say why it is refused.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert expected in str(info.value)
    assert variable.removeprefix("ACTMAP_").lower() in str(info.value)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_isal_level_is_accepted(level: int) -> None:
    assert Settings(png_compress_level=level).png_compress_level == level


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.queue = "other"  # type: ignore[misc]


def test_the_settings_page_is_generated_from_the_fields_and_current() -> None:
    # Given the page docs/settings.md, when generated again from Settings' fields, it is the same.
    generator = _load_script("generate_settings_doc")
    page = generator.render()
    assert generator.OUTPUT.read_text() == page, (
        "docs/settings.md is stale: run scripts/generate_settings_doc.py"
    )
    for name, field in Settings.model_fields.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `ACTMAP_{name.upper()}` |"))
        assert str(field.description) in row, name


def _load_script(name: str) -> Any:
    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
