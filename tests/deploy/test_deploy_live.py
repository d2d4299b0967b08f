"""Proven, not only linted: the container's command starts a real server (with the environment the cpu pod gets),
a real Prometheus runs deploy/prometheus.yml against it, and every PromQL expression of the dashboard and the
alert rules is evaluated by that Prometheus over the server's real metrics.

Traffic goes to 127.0.0.1 only, in bounded loops."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    K8S,
    REPO,
    TEXTS,
    Server,
    dashboard_exprs,
    exposition_names,
    free_port,
    grafana_to_promql,
    image_argv,
    image_settings,
    kustomize,
    metric_names,
    one,
    parse_dockerfile,
    rule_exprs,
    selectors,
    send_traffic,
    start_server,
)

pytestmark = pytest.mark.slow

RATE_INTERVAL = "30s"  # Grafana's $__rate_interval at this test's 1 s scrape interval, with room for jitter

# Series Prometheus makes itself for every target (not in the server's /metrics).
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}


def container_argv() -> list[str]:
    """The cpu image's command (`python -m service`), made runnable here with this interpreter."""
    argv = image_argv(parse_dockerfile(REPO / "Dockerfile").stage("cpu"))
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def pod_environment(bundle: Path, port: int) -> dict[str, str]:
    """BERTSERVE_* variables of the cpu pod (the image's ENV under the cpu overlay's ConfigMap), with the model
    directory, address and port of this machine in place of the container's."""
    env = image_settings(parse_dockerfile(REPO / "Dockerfile").stage("cpu"))
    objects = kustomize(K8S / "overlays" / "cpu")
    deployment = one(objects, "Deployment")
    name = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    env.update(one(objects, "ConfigMap", name)["data"])
    assert env["BERTSERVE_MODEL_DIR"] == "/models" and env["BERTSERVE_HOST"] == "0.0.0.0", env
    env.update(BERTSERVE_MODEL_DIR=str(bundle), BERTSERVE_HOST="127.0.0.1", BERTSERVE_PORT=str(port))
    env.setdefault("BERTSERVE_GRPC_PORT", "0")  # the test only needs HTTP: no shared gRPC port
    return env


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory, kubectl: str) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(container_argv(), port, log, env=pod_environment(tiny_bundle, port))
    yield srv
    srv.stop()


@dataclass
class Prometheus:
    url: str
    client: httpx.Client

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self.client.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}\n-> {body}"
        return body["data"]["result"]


def derived_config(target: str, prometheus_port: int) -> dict[str, Any]:
    """deploy/prometheus.yml with its bertserve target pointed at the test server and 1 s intervals."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / pattern) for pattern in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "bertserve" in jobs, "deploy/prometheus.yml lost its bertserve job"
    for static in jobs["bertserve"]["static_configs"]:
        static["targets"] = [target]
    for name, job in jobs.items():
        if name != "bertserve":
            for static in job.get("static_configs", []):
                static["targets"] = [f"127.0.0.1:{prometheus_port}"]
    return config


@pytest.fixture(scope="module")
def prometheus(server: Server, prometheus_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(derived_config(server.url.removeprefix("http://"), port)), encoding="utf-8")
    log = work / "prometheus.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(timeout=10.0)
    prom = Prometheus(f"http://127.0.0.1:{port}", client)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-4000:]}"
            try:
                if client.get(f"{prom.url}/-/ready").status_code == 200 and prom.query('up{job="bertserve"} == 1'):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"bertserve target never up:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield prom
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def loaded(prometheus: Prometheus, server: Server) -> dict[str, Any]:
    """Traffic until Prometheus has seen it across scrapes; returns the p99 query result."""
    expr = "histogram_quantile(0.99, sum by (le) (rate(bertserve_request_duration_seconds_bucket[30s])))"
    deadline = time.monotonic() + 60
    while True:
        send_traffic(server.url)
        time.sleep(1.5)
        result = prometheus.query(expr)
        if result and math.isfinite(float(result[0]["value"][1])):
            return {"expr": expr, "result": result}
        assert time.monotonic() < deadline, f"no finite p99 after 60 s of traffic: {result}"


def test_prometheus_computes_p99_latency_from_the_histogram(loaded: dict[str, Any]) -> None:
    value = float(loaded["result"][0]["value"][1])
    assert 0 < value < 30, value


def test_every_dashboard_query_evaluates_and_has_data(prometheus: Prometheus, loaded: dict[str, Any]) -> None:
    empty = []
    for title, expr in dashboard_exprs():
        if not prometheus.query(grafana_to_promql(expr, RATE_INTERVAL)):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels that would show 'No data' after traffic:\n" + "\n".join(empty)


def test_every_alert_rule_evaluates_and_prometheus_reports_it_healthy(prometheus: Prometheus, loaded) -> None:
    for _, expr in rule_exprs():
        prometheus.query(expr)  # asserts status success
    expected = {name for name, _ in rule_exprs()}
    deadline = time.monotonic() + 30
    while True:
        groups = prometheus.client.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        evaluated = {n for n, r in rules.items() if not r.get("lastEvaluation", "").startswith("0001")}
        if expected <= evaluated:
            break
        assert time.monotonic() < deadline, f"rules never evaluated: {expected - evaluated}"
        time.sleep(1)
    assert set(rules) == expected
    bad = {n: r.get("lastError") for n, r in rules.items() if r["health"] != "ok"}
    assert not bad, bad


def test_every_metric_and_label_matcher_in_the_queries_exists(prometheus: Prometheus, server: Server, loaded) -> None:
    """A renamed metric or label value makes a panel or alert silently empty: every metric named must be in the
    server's /metrics, and every selector must match real series (status matchers aside: no 5xx happened)."""
    exposition = httpx.get(f"{server.url}/metrics", timeout=10).text
    available = exposition_names(exposition) | SYNTHETIC
    missing, unmatched = set(), []
    for source, expr in dashboard_exprs() + rule_exprs():
        promql = grafana_to_promql(expr, RATE_INTERVAL)
        missing |= {f"{name} ({source})" for name in metric_names(promql) - available}
        for metric, matchers in selectors(promql):
            kept = [f"{label}{op}{value}" for label, op, value in matchers if label != "status"]
            probe = f"count({metric}{{{', '.join(kept)}}})"
            if not prometheus.query(probe):
                unmatched.append(f"{source}: {probe}")
    assert not missing and not unmatched, (
        f"metrics not exposed by the server: {sorted(missing)}\nselectors matching no series:\n" + "\n".join(unmatched)
    )


def test_model_info_reports_the_provider(prometheus: Prometheus, loaded) -> None:
    result = prometheus.query('bertserve_model_info{job="bertserve"}')
    assert len(result) == 1
    assert result[0]["metric"]["provider"], result
    assert "CPU" in result[0]["metric"]["provider"], "the cpu pod environment sets BERTSERVE_PROVIDER=cpu"


def test_image_healthcheck_command_passes_on_the_server_and_fails_without_one(server: Server) -> None:
    """The HEALTHCHECK's script, with the port from the environment as in the image."""
    stage = parse_dockerfile(REPO / "Dockerfile").stage("cpu")
    argv = json.loads(stage.last("HEALTHCHECK").body().partition(" ")[2])
    assert argv == ["python", "/opt/bertserve/healthcheck.py"], argv
    script = [sys.executable, str(REPO / "deploy/docker/healthcheck.py")]
    port = server.url.rsplit(":", 1)[1]
    for env_port, expected in ((port, 0), (str(free_port()), 1)):
        env = {**os.environ, "BERTSERVE_PORT": env_port}
        done = subprocess.run(script, capture_output=True, timeout=30, check=False, env=env)
        assert done.returncode == expected, (env_port, done.stderr)


def test_sigterm_drains_and_exits_0_within_the_pod_grace_period(tiny_bundle: Path, tmp_path: Path, kubectl) -> None:
    """The pod's settings (drain delay, drain timeout) let the process exit cleanly inside
    terminationGracePeriodSeconds - preStop, with a request in flight when the signal arrives."""
    objects = kustomize(K8S / "overlays" / "cpu")
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    budget = spec["terminationGracePeriodSeconds"] - spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    port = free_port()
    srv = start_server(container_argv(), port, tmp_path / "server.log", env=pod_environment(tiny_bundle, port))
    try:
        with httpx.Client(base_url=srv.url, timeout=30.0) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, "/v1/predict", json={"inputs": TEXTS * 8}) for _ in range(4)]
            time.sleep(0.05)
            started = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            code = srv.process.wait(timeout=budget + 10)
            elapsed = time.monotonic() - started
            statuses = [f.result().status_code for f in futures]
    finally:
        srv.stop(timeout=5)
    assert code == 0, srv.logs()
    assert elapsed <= budget, f"drain took {elapsed:.1f} s, the pod allows {budget} s"
    assert statuses == [200] * 4, statuses
