"""`docker compose --profile cpu up` for real (Docker Compose v2 on the local engine): bertserve from the CPU
image and Prometheus from the stand-in image built from Debian's package (PROMETHEUS_IMAGE), with the
repository's docker-compose.yml, prometheus.yml and alert rules unchanged. Prometheus scrapes bertserve over
the compose network, the rules load and evaluate, and after a short load every Grafana panel's PromQL returns
data from the live Prometheus. Grafana itself cannot be pulled here (no registry); its provisioning files are
checked against their schema in test_deploy_grafana.py.

The stack runs under its own project name on free loopback ports; the model is a copy of the test bundle under
models/ (the directory the compose file mounts from), removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from containers import COMPOSE_UP, REPORT, compose_argv, docker, free_ports, shell
from deploy_support import REPO, dashboard_exprs, grafana_to_promql, rule_exprs, send_traffic

pytestmark = pytest.mark.slow

# Grafana's $__rate_interval for deploy/prometheus.yml's 10 s scrape interval: max(4 x 10 s, interval + 10 s)
RATE_INTERVAL = "40s"


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    bertserve: str  # http://127.0.0.1:PORT
    prometheus: str


def compose(stack_env: dict[str, str], *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [*compose_argv(), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **stack_env},
    )
    assert proc.returncode == 0, (
        f"compose {' '.join(args)}: {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    )
    return proc.stdout


def wait_for(what: str, check: object, timeout: float) -> float:
    """Poll `check()` until it is truthy; the seconds it took."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            last = check()  # type: ignore[operator]
            if last:
                return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def query(prometheus: str, expr: str) -> list[dict[str, object]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}\n-> {body}"
    return list(body["data"]["result"])


@pytest.fixture(scope="module")
def stack(cpu_image: str, tiny_bundle: Path) -> Iterator[Stack]:
    project = f"bertserve-test-{os.getpid()}"
    model = REPO / "models" / project
    shutil.copytree(tiny_bundle, model)
    for path in (model.parent, model, *model.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the image's non-root user reads the mount
    http = free_ports(2)
    prometheus = free_ports(1)
    env = {
        "COMPOSE_PROJECT_NAME": project,
        "BERTSERVE_MODEL": project,
        "BERTSERVE_HTTP_PUBLISH": str(http),
        "BERTSERVE_GRPC_PUBLISH": str(http + 1),
        "PROMETHEUS_PUBLISH": str(prometheus),
    }
    command = COMPOSE_UP.replace("docker compose", " ".join(compose_argv()))
    try:
        REPORT["compose up"] = f"{shell(command, timeout=300, env=env):.1f} s"
        yield Stack(project, env, f"http://127.0.0.1:{http}", f"http://127.0.0.1:{prometheus}")
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            print(compose(env, "logs", "--no-color", "--tail", "40", timeout=60)[-6000:])
        compose(env, "down", "--volumes", "--timeout", "60", timeout=240)
        shutil.rmtree(model, ignore_errors=True)


def test_bertserve_is_ready_and_prometheus_scrapes_it(stack: Stack) -> None:
    ready = wait_for("bertserve ready", lambda: httpx.get(f"{stack.bertserve}/readyz").status_code == 200, 90)
    up = wait_for("target up", lambda: query(stack.prometheus, 'up{job="bertserve"} == 1'), 90)
    REPORT["compose: bertserve ready / scraped"] = f"{ready:.1f} s / {ready + up:.1f} s after up"


def test_the_alert_rules_load_and_evaluate_healthy(stack: Stack) -> None:
    expected = {name for name, _ in rule_exprs()}

    def evaluated() -> bool:
        groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(rules) == expected, set(rules) ^ expected
        done = {n for n, r in rules.items() if not r.get("lastEvaluation", "").startswith("0001")}
        bad = {n: r.get("lastError") for n, r in rules.items() if r["health"] not in ("ok", "unknown")}
        assert not bad, bad
        return done == expected

    wait_for("every rule evaluated", evaluated, 60)


def test_after_a_short_load_every_dashboard_panel_has_data(stack: Stack) -> None:
    exprs = [(title, grafana_to_promql(expr, RATE_INTERVAL)) for title, expr in dashboard_exprs()]
    empty: list[str] = []

    def all_have_data() -> bool:
        send_traffic(stack.bertserve)
        empty[:] = [f"{title}: {expr}" for title, expr in exprs if not query(stack.prometheus, expr)]
        return not empty

    try:
        took = wait_for("every panel has data", all_have_data, 120)
    except AssertionError:
        raise AssertionError("panels that show 'No data' after load:\n" + "\n".join(empty)) from None
    REPORT["compose: every panel has data"] = f"after {took:.0f} s of load ({len(exprs)} queries)"
    info = query(stack.prometheus, 'bertserve_model_info{job="bertserve"} == 1')
    assert [m["metric"]["provider"] for m in info] == ["CPUExecutionProvider"], info  # type: ignore[index]


def test_compose_stop_drains_bertserve_to_exit_0_within_its_grace_period(stack: Stack) -> None:
    container = compose(stack.env, "ps", "--quiet", "bertserve-cpu").strip()
    started = time.monotonic()
    compose(stack.env, "stop", "bertserve-cpu", timeout=120)
    elapsed = time.monotonic() - started
    code = docker("inspect", "--format", "{{.State.ExitCode}}", container).strip()
    REPORT["compose stop bertserve"] = f"exit {code} after {elapsed:.1f} s"
    assert code == "0" and elapsed < 45
