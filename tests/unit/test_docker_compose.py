"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from producer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_parses_and_has_redis_an_s3_server_its_bucket_and_workers() -> None:
    services = compose()["services"]
    assert {"redis", "s3", "create-bucket", "worker"} <= set(services)
    assert "mc mb" in " ".join(services["create-bucket"]["command"])


def test_every_actmap_variable_the_worker_gets_is_a_real_setting() -> None:
    environment = compose()["services"]["worker"]["environment"]
    fields = {f"ACTMAP_{name.upper()}" for name in Settings.model_fields}
    actmap_names = {name for name in environment if name.startswith("ACTMAP_")}
    assert actmap_names, "the worker service sets no ACTMAP_ settings"
    assert actmap_names <= fields, f"not settings: {sorted(actmap_names - fields)}"


def test_the_worker_service_can_be_scaled() -> None:
    worker = compose()["services"]["worker"]
    # a fixed container name or host port would make `--scale worker=N` fail
    assert "container_name" not in worker and "ports" not in worker
    assert (ROOT / worker["build"] / "Dockerfile").exists()


def test_the_bucket_the_workers_write_to_is_the_one_created() -> None:
    services = compose()["services"]
    bucket = services["worker"]["environment"]["ACTMAP_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(services["create-bucket"]["command"])
