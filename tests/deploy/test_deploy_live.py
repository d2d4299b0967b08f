"""Proven, not only linted: the container's command starts a real server (with the environment the cpu pod gets),
a real Prometheus runs deploy/prometheus.yml against it, and every PromQL expression of the dashboard and the
alert rules is evaluated by that Prometheus over the server's real metrics.

Traffic goes to 127.0.0.1 only, in bounded loops."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
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
    Server,
    exposition_names,
    free_port,
    image_argv,
    kustomize,
    metric_names,
    one,
    parse_dockerfile,
    selectors,
    service_argv,
    start_server,
)

pytestmark = pytest.mark.slow

# Series Prometheus makes itself for every target (not in the server's /metrics).
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
TEXTS = ["a great film, I loved it", "the hotel was terrible", "it was okay I guess", "fine", "x " * 40]


def container_argv(bundle: Path, port: int) -> list[str]:
    """The cpu image's ENTRYPOINT + CMD, made runnable here: this interpreter, the test bundle, a free port."""
    argv = image_argv(parse_dockerfile(REPO / "Dockerfile").stage("cpu"))
    replace = {"python": sys.executable, "/models": str(bundle), "0.0.0.0": "127.0.0.1", "8000": str(port)}
    return [replace.get(arg, arg) for arg in argv]


def pod_environment() -> dict[str, str]:
    """BERTSERVE_* variables of the cpu pod: the image's ENV under the cpu overlay's ConfigMap."""
    env = {
        k: v for k, v in parse_dockerfile(REPO / "Dockerfile").stage("cpu").env().items() if k.startswith("BERTSERVE_")
    }
    objects = kustomize(K8S / "overlays" / "cpu")
    deployment = one(objects, "Deployment")
    name = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    env.update(one(objects, "ConfigMap", name)["data"])
    return env


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory, kubectl: str) -> Iterator[Server]:
    port = free_port()
    argv = container_argv(tiny_bundle, port)
    # The container starts the service exactly the way the tests start it.
    assert argv == service_argv(tiny_bundle, port), argv
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(argv, port, log, env=pod_environment())
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


def send_traffic(url: str, rounds: int = 1) -> None:
    """Bounded traffic: single and batched predicts, some concurrent (so batches form), one v2 infer, and refused
    requests (a malformed body, too many inputs) so that error series exist too."""
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for _ in range(rounds):
            for text in TEXTS:
                assert client.post("/v1/predict", json={"inputs": text}).status_code == 200
            assert client.post("/v1/predict", json={"inputs": TEXTS}).status_code == 200
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                codes = list(pool.map(lambda t: client.post("/v1/predict", json={"inputs": t}).status_code, TEXTS * 4))
            assert codes == [200] * len(codes)
            name = client.get("/v1/models").json()["name"]
            v2 = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]}
            assert client.post(f"/v2/models/{name}/infer", json=v2).status_code == 200
            assert client.post("/v1/predict", json={"inputs": 42}).status_code == 422
            assert client.post("/v1/predict", json={"inputs": ["x"] * 10_000}).status_code == 413


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


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/bertserve.json").read_text(encoding="utf-8"))
    out = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        # label_values(SELECTOR, LABEL) is Grafana's; its selector is PromQL.
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        out.append((f"variable {variable['name']}", match.group(1)))
    return out


def grafana_to_promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\w+", ".*", expr)  # dashboard variables (job, instance): all values


def rule_exprs() -> list[tuple[str, str]]:
    out = []
    for path in sorted((DEPLOY / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            out += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in group["rules"]]
    return out


def test_prometheus_computes_p99_latency_from_the_histogram(loaded: dict[str, Any]) -> None:
    value = float(loaded["result"][0]["value"][1])
    assert 0 < value < 30, value


def test_every_dashboard_query_evaluates_and_has_data(prometheus: Prometheus, loaded: dict[str, Any]) -> None:
    empty = []
    for title, expr in dashboard_exprs():
        if not prometheus.query(grafana_to_promql(expr)):
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
        promql = grafana_to_promql(expr)
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
    stage = parse_dockerfile(REPO / "Dockerfile").stage("cpu")
    argv = json.loads(stage.last("HEALTHCHECK").body().partition(" ")[2])
    script = REPO / "deploy/docker/healthcheck.py"
    assert argv[1] == "/opt/bertserve/healthcheck.py"
    url = argv[2].replace("127.0.0.1:8000", server.url.removeprefix("http://"))
    ok = subprocess.run([sys.executable, str(script), url], capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    dead = argv[2].replace("8000", str(free_port()))
    down = subprocess.run([sys.executable, str(script), dead], capture_output=True, timeout=30, check=False)
    assert down.returncode == 1


def test_sigterm_drains_and_exits_0_within_the_pod_grace_period(tiny_bundle: Path, tmp_path: Path, kubectl) -> None:
    """The pod's settings (drain delay, drain timeout) let the process exit cleanly inside
    terminationGracePeriodSeconds - preStop, with a request in flight when the signal arrives."""
    objects = kustomize(K8S / "overlays" / "cpu")
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    budget = spec["terminationGracePeriodSeconds"] - spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    port = free_port()
    srv = start_server(container_argv(tiny_bundle, port), port, tmp_path / "server.log", env=pod_environment())
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
