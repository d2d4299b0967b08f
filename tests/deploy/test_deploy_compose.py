"""docker-compose.yml: the Compose Specification schema (check-jsonschema's vendored compose-spec), then what the
schema cannot know: the services agree with the Dockerfile, the settings are real settings, Prometheus and
Grafana find what they are pointed at."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, REPO, image_settings, parse_dockerfile, require_tool

COMPOSE = REPO / "docker-compose.yml"
APP_SERVICES = {"bertserve-gpu": "gpu", "bertserve-cpu": "cpu"}  # service -> Dockerfile target and profile


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = require_tool("check-jsonschema", "pip install -e '.[dev]' (package check-jsonschema)")
    return subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # PyYAML resolves the `<<` merge keys


def seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_file_validates_against_the_compose_spec() -> None:
    proc = check_compose_schema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    """Control: the validator really applies the schema (here: `stop_grace_periode` is not a service key)."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:", "stop_grace_periode:"))
    proc = check_compose_schema(broken)
    assert proc.returncode != 0 and "stop_grace_periode" in proc.stdout, proc.stdout


def test_gpu_service_reserves_an_nvidia_gpu_and_cpu_service_is_a_profile(compose) -> None:
    services = compose["services"]
    gpu = services["bertserve-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert gpu["environment"]["BERTSERVE_PROVIDER"] == "cuda"
    cpu = services["bertserve-cpu"]
    assert "reservations" not in cpu.get("deploy", {}).get("resources", {})
    assert cpu["environment"]["BERTSERVE_PROVIDER"] == "cpu"
    for name, target in APP_SERVICES.items():
        assert services[name]["profiles"] == [target]
        assert services[name]["build"]["target"] == target


def test_app_services_run_the_image_command_and_health_check() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    dockerfile = parse_dockerfile(REPO / "Dockerfile")
    for name, target in APP_SERVICES.items():
        service = compose["services"][name]
        stage = dockerfile.stage(target)
        # a `command:` would pass flags, and flags win over the environment the service is configured by
        assert "command" not in service and "entrypoint" not in service, name
        healthcheck = stage.last("HEALTHCHECK").body().partition(" ")[2]
        assert service["healthcheck"]["test"] == ["CMD", *yaml.safe_load(healthcheck)], name
        assert seconds(service["healthcheck"]["start_period"]) >= 60, "model load + warm-up need time"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "bertserve" in service["networks"]["default"]["aliases"], "Prometheus scrapes bertserve:8000"
        port = int({**image_settings(stage), **service["environment"]}["BERTSERVE_PORT"])
        published = {p.rsplit(":", 1)[1] for p in service["ports"]}
        assert published == {str(port), str(port + 1)}, f"{name}: publish HTTP and gRPC, not {published}"


def test_settings_are_real_and_valid(compose, monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic-settings ignores unknown BERTSERVE_* variables, so a typo would silently do nothing."""
    from service.config import Settings

    known = {f"BERTSERVE_{name.upper()}" for name in Settings.model_fields}
    for name in APP_SERVICES:
        env = compose["services"][name]["environment"]
        unknown = {k for k in env if k.startswith("BERTSERVE_")} - known
        assert not unknown, f"{name}: not settings: {unknown}"
        for key in [k for k in os.environ if k.startswith("BERTSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if value is not None:
                monkeypatch.setenv(key, str(value))
        Settings()  # raises on a value the service would refuse at start-up


def test_stop_grace_period_covers_the_drain(compose) -> None:
    from service.config import Settings

    for name in APP_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        delay = float(env.get("BERTSERVE_DRAIN_DELAY_S", Settings.model_fields["drain_delay_s"].default))
        timeout = float(env.get("BERTSERVE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default))
        grace = seconds(service["stop_grace_period"])
        assert grace >= delay + timeout + 5, f"{name}: stop_grace_period {grace}s < drain {delay}+{timeout}s + 5s"


def test_bind_mounts_exist(compose) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if "${" in source or not source.startswith("."):
                continue  # named volume, or the model path the user picks
            assert (REPO / source).exists(), f"{name}: bind source {source} does not exist"


def _mount_target(service: dict[str, Any], source: str) -> str:
    for volume in service["volumes"]:
        if isinstance(volume, str) and volume.split(":")[0].rstrip("/") == source:
            return volume.split(":")[1]
    raise AssertionError(f"{source} is not mounted")


def test_prometheus_scrapes_the_app_and_loads_the_rules(compose) -> None:
    prom = compose["services"]["prometheus"]
    config_path = _mount_target(prom, "./deploy/prometheus.yml")
    assert f"--config.file={config_path}" in prom["command"]
    rules_dir = _mount_target(prom, "./deploy/rules")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    globs = [str(Path(config_path).parent / g) for g in config["rule_files"]]
    assert any(g.startswith(rules_dir + "/") for g in globs), (globs, rules_dir)

    job = next(j for j in config["scrape_configs"] if j["job_name"] == "bertserve")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    for target in targets:
        host, port = target.split(":")
        for name in APP_SERVICES:
            service = compose["services"][name]
            assert host in service["networks"]["default"]["aliases"], f"{host} does not resolve to {name}"
            stage = parse_dockerfile(REPO / "Dockerfile").stage(APP_SERVICES[name])
            assert port == {**image_settings(stage), **service["environment"]}["BERTSERVE_PORT"], name


def test_grafana_provisioning_matches_the_mounts(compose) -> None:
    grafana = compose["services"]["grafana"]
    assert _mount_target(grafana, "./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    dashboards_dir = _mount_target(grafana, "./deploy/grafana/dashboards")
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/bertserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert re.fullmatch(r"http://prometheus:9090/?", url), url
    assert [p.rsplit(":", 1)[1] for p in compose["services"]["prometheus"]["ports"]] == ["9090"]
