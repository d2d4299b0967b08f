"""The CPU image, built from the unmodified Dockerfile on a real engine and run the way docker-compose.yml runs it:
the compose service's hardening (read-only root, tmpfs /tmp, every capability dropped, no-new-privileges) and
environment, host networking on free loopback ports. Configured only through the environment: a port, a key
file and an admin key file, no command override.

One container serves every check; the last one stops it under keep-alive load (`docker stop`, as compose does).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from containers import (
    COMPOSE_UP,
    CPU_BUILD,
    REPORT,
    SETUP_COMMANDS,
    Container,
    free_ports,
    running,
)
from deploy_support import REPO, TEXTS

from service.bundle import load_bundle
from service.config import RuntimeOptions
from service.modelio import Encoder
from service.runtime import ModelRuntime
from tests.keepalive import KeepAliveClient

pytestmark = pytest.mark.slow

API_KEY = "inference-key-from-a-file"
ADMIN_KEY = "admin-key-from-a-file"


def compose_service() -> dict[str, Any]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    return dict(compose["services"]["bertserve-cpu"])


def seconds(duration: str) -> int:
    """A compose duration (`45s`, `1m30s`) in whole seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(value) * units[unit] for value, unit in re.findall(r"(\d+)([smh])", duration))


def compose_options(service: dict[str, Any]) -> list[str]:
    """`docker run` options for what the compose service sets on its container (hardening and environment)."""
    options = ["--read-only"] if service.get("read_only") else []
    options += [f"--tmpfs={path}" for path in service.get("tmpfs", [])]
    options += [f"--cap-drop={cap}" for cap in service.get("cap_drop", [])]
    options += [f"--security-opt={opt}" for opt in service.get("security_opt", [])]
    options += [f"--env={k}={v}" for k, v in service["environment"].items() if v is not None]
    return options


@dataclass
class Served:
    container: Container
    url: str
    grpc_port: int
    bundle: Path
    ready_s: float


@pytest.fixture(scope="module")
def served(cpu_image: str, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "api-key").write_text(API_KEY + "\n")
    (secrets / "admin-key").write_text(ADMIN_KEY + "\n")
    for path in (secrets, *secrets.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the container's non-root user reads them, as a secret
    port = free_ports(2)
    options = [
        "--network=host",
        *compose_options(compose_service()),
        f"--volume={tiny_bundle}:/models:ro",
        f"--volume={secrets}:/run/secrets:ro",
        # only the environment: the port (gRPC follows), loopback on this machine, keys from files
        f"--env=BERTSERVE_PORT={port}",
        "--env=BERTSERVE_HOST=127.0.0.1",
        "--env=BERTSERVE_API_KEY_FILE=/run/secrets/api-key",
        "--env=BERTSERVE_ADMIN_API_KEY_FILE=/run/secrets/admin-key",
    ]
    with running(cpu_image, options) as container:
        url = f"http://127.0.0.1:{port}"
        ready_s = container.wait_ready(url, timeout=60)
        REPORT["cpu container ready"] = f"{ready_s:.1f} s after start"
        yield Served(container, url, port + 1, tiny_bundle, ready_s)


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_the_readme_gives_the_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for command in (*SETUP_COMMANDS, CPU_BUILD, COMPOSE_UP):
        assert command in readme, f"README 'Deploy' does not show the command the tests run:\n{command}"


def test_runs_as_a_numeric_non_root_user_with_compose_hardening(served: Served) -> None:
    info = served.container.inspect()
    user = info["Config"]["User"]
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"image USER must be numeric uid:gid, not {user!r}"
    assert served.container.exec("id", "-u").strip() == user.split(":")[0]
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] or host["CapDrop"] == ["all"], host["CapDrop"]
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"]), host["SecurityOpt"]
    denied = served.container.exec_status("touch", "/opt/bertserve/written")
    assert denied != 0, "the root filesystem is writable"


def test_ready_within_60_seconds_on_a_real_bundle(served: Served) -> None:
    assert served.ready_s < 60


def in_process_scores(bundle: Path, texts: list[str]) -> np.ndarray:
    """The same bundle's scores computed here: tokenizer, ONNX Runtime session (fp32, CPU) and head."""
    loaded = load_bundle(bundle)
    encoder = Encoder.from_file(loaded.tokenizer_path, loaded.manifest.max_length)
    runtime = ModelRuntime(loaded, RuntimeOptions(provider="cpu", variant="fp32"))
    head = loaded.manifest.head()
    return head.scores(runtime.run(encoder.encode(texts)))


def test_predictions_equal_the_in_process_ones(served: Served) -> None:
    response = httpx.post(f"{served.url}/v1/predict", json={"inputs": TEXTS}, headers=auth(), timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    labels = load_bundle(served.bundle).manifest.labels
    served_scores = np.array(
        [[{p["label"]: p["score"] for p in row}[name] for name in labels] for row in body["predictions"]]
    )
    expected = in_process_scores(served.bundle, TEXTS)
    np.testing.assert_allclose(served_scores, expected, atol=1e-5)
    assert [row[0] for row in body["labels"]] == [labels[i] for i in expected.argmax(axis=1)]


def test_the_grpc_port_follows_the_http_port(served: Served) -> None:
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    try:
        assert client.is_server_ready()
        text = triton_grpc.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"a great film"], dtype=object))
        result = client.infer("tiny", [text], headers=auth())
        assert result.as_numpy("logits").shape == (1, 3)
    finally:
        client.close()


def test_keys_come_from_files_and_only_the_admin_key_reaches_the_repository(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as client:
        assert client.post("/v1/predict", json={"inputs": "x"}).status_code == 401
        assert client.post("/v1/predict", json={"inputs": "x"}, headers=auth(ADMIN_KEY)).status_code == 401
        assert client.post("/v1/admin/reload", json={}, headers=auth()).status_code == 401
        reloaded = client.post("/v1/admin/reload", json={}, headers=auth(ADMIN_KEY))
        assert reloaded.status_code == 200, reloaded.text
        assert client.post("/v1/predict", json={"inputs": "x"}, headers=auth()).status_code == 200
    logs = served.container.logs()
    assert API_KEY not in logs and ADMIN_KEY not in logs


def test_docker_healthcheck_follows_the_port_and_reports_healthy(served: Served) -> None:
    REPORT["cpu container healthy"] = f"{served.container.wait_health('healthy', timeout=60):.1f} s after start"
    log = served.container.inspect()["State"]["Health"]["Log"]
    assert log and log[-1]["ExitCode"] == 0, log


def test_no_torch_transformers_or_training_code_in_the_image(cpu_image: str, served: Served) -> None:
    found = served.container.exec(
        "python",
        "-c",
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'transformers', 'training', 'service')}))",
    )
    assert json.loads(found) == {"torch": False, "transformers": False, "training": False, "service": True}
    listing = served.container.exec("sh", "-c", "ls /opt/venv/lib/python3*/site-packages")
    assert not [name for name in listing.split() if name.startswith(("torch", "training", "nvidia"))], listing


def test_docker_stop_under_keep_alive_load_loses_nothing_and_exits_0_in_the_grace_period(served: Served) -> None:
    grace = seconds(compose_service()["stop_grace_period"])
    body = json.dumps({"inputs": TEXTS}).encode()
    port = int(served.url.rsplit(":", 1)[1])
    clients = [KeepAliveClient(port, body, headers=auth()) for _ in range(16)]
    for client in clients:
        client.start()
    time.sleep(1.0)
    code, elapsed = served.container.stop(grace)
    for client in clients:
        client.join(30)
    answered = sum(c.answered for c in clients)
    errors = [e for c in clients for e in c.errors]
    REPORT["docker stop under load"] = (
        f"exit {code} after {elapsed:.1f} s (grace {grace} s); {answered} answered, {len(errors)} lost, "
        f"{sum(c.refused for c in clients)} refused after the listener closed"
    )
    assert code == 0, served.container.logs()[-4000:]
    assert elapsed < grace
    assert answered > 0 and not errors, errors[:5]
    logs = served.container.logs()
    assert "Traceback" not in logs and " ERROR " not in logs, logs[-4000:]
