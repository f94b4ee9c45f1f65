"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one."""

from __future__ import annotations

import re
import tomllib
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


def test_the_flower_service_reads_the_workers_broker_and_results_from_the_same_settings() -> None:
    services = compose()["services"]
    flower, worker = services["flower"], services["worker"]
    fields = {f"ACTMAP_{name.upper()}" for name in Settings.model_fields}
    actmap_names = {name for name in flower["environment"] if name.startswith("ACTMAP_")}
    assert actmap_names <= fields, f"not settings: {sorted(actmap_names - fields)}"
    for name in ("ACTMAP_BROKER_URL", "ACTMAP_RESULT_BACKEND"):
        assert flower["environment"].get(name) == worker["environment"][name], name
    assert "redis" in flower["depends_on"]


def test_the_flower_service_runs_flower_on_the_worker_app_from_the_image_that_installs_it() -> None:
    flower, worker = compose()["services"]["flower"], compose()["services"]["worker"]
    command = [*flower["entrypoint"], *flower["command"]]
    # as docs/operating.md tells users to start it, on the port the service publishes
    assert command[:4] == ["celery", "-A", "worker.app", "flower"], command
    assert "--port=5555" in command and "5555:5555" in flower["ports"], (command, flower["ports"])
    assert flower["build"] == worker["build"]
    install = re.search(r"^RUN pip install (.*)$", (ROOT / worker["build"] / "Dockerfile").read_text(), re.M)
    extras_installed = re.search(r'"\.\[([a-z,]+)\]"', install.group(1)) if install else None
    assert extras_installed and "flower" in extras_installed.group(1).split(","), "no flower in the image"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("flower") for requirement in extras["flower"]), extras["flower"]
