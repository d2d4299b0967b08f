"""The service runs with exactly the image's dependencies: what deploy/docker/requirements.py resolves from
pyproject.toml (constrained by requirements/service.lock), nothing from the dev or train extras.

A virtualenv is built with just those (cached under build/, keyed by the files that decide its contents), and
- every module the service imports anywhere (top level or inside a function: an AST walk of service/) must be
  importable in it: an import the service needs but pyproject.toml does not declare fails here, not in a
  container at start-up;
- the server starts in it from a directory holding only service/ (as the image has it), answers HTTP and gRPC,
  with one API process and with several, and drains to exit 0.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from containers import free_ports
from deploy_support import REPO, Server, start_server

pytestmark = pytest.mark.slow

SERVICE = REPO / "service"
DECIDING = ("pyproject.toml", "requirements/service.lock", "deploy/docker/requirements.py")


def build_image_env() -> Path:
    """A virtualenv with the cpu image's requirements; rebuilt only when a deciding file changes."""
    digest = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in DECIDING)).hexdigest()[:16]
    env = REPO / "build" / f"image-env-{digest}"
    python = env / "bin" / "python"
    if (env / ".complete").is_file():
        return env
    shutil.rmtree(env, ignore_errors=True)
    for stale in (REPO / "build").glob("image-env-*"):
        shutil.rmtree(stale, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(env)], check=True, timeout=120)
    requirements = subprocess.run(
        [str(python), str(REPO / "deploy/docker/requirements.py"), "--flavor", "cpu", str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (env / "requirements.txt").write_text(requirements)
    lock = str(REPO / "requirements/service.lock")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-r", str(env / "requirements.txt"), "-c", lock],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    (env / ".complete").touch()
    return env


@pytest.fixture(scope="module")
def image_env() -> Path:
    return build_image_env()


@pytest.fixture(scope="module")
def service_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with service/ and nothing else of the repository (no training/, tests/ or bench/)."""
    root = tmp_path_factory.mktemp("image-root")
    (root / "service").symlink_to(SERVICE, target_is_directory=True)
    return root


def imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> service files importing it, anywhere in the file (deferred imports too)."""
    found: dict[str, set[str]] = {}
    for path in sorted(SERVICE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return found


def test_every_module_the_service_imports_is_declared(image_env: Path, service_only: Path) -> None:
    third_party = {
        name: files
        for name, files in imported_modules().items()
        if name not in sys.stdlib_module_names and name not in {"service", "__future__"}
    }
    assert "onnxruntime" in third_party and "uvicorn" in third_party  # the walk sees the service's imports
    probe = (
        "import importlib.util, json, sys; "
        "print(json.dumps([n for n in sys.argv[1:] if importlib.util.find_spec(n) is None]))"
    )
    out = subprocess.run(
        [str(image_env / "bin" / "python"), "-c", probe, *sorted(third_party)],
        cwd=service_only,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    missing = json.loads(out)
    assert not missing, "imported by the service but not installed by its declared dependencies: " + ", ".join(
        f"{name} ({', '.join(sorted(third_party[name]))})" for name in missing
    )


def test_no_training_or_dev_dependency_leaks_into_the_image_requirements(image_env: Path) -> None:
    listing = subprocess.run(
        [str(image_env / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    installed = {p["name"].lower() for p in json.loads(listing)}
    leaked = installed & {"torch", "transformers", "onnx", "pytest", "httpx", "onnxruntime-gpu", "mypy"}
    assert not leaked, leaked


@pytest.fixture(params=[1, 2], ids=["one-api-process", "two-api-processes"])
def server(request: pytest.FixtureRequest, image_env: Path, service_only: Path, tiny_bundle: Path) -> Iterator[Server]:
    port = free_ports(2)
    argv = [str(image_env / "bin" / "python"), "-m", "service"]
    env = {
        "BERTSERVE_MODEL_DIR": str(tiny_bundle),
        "BERTSERVE_PORT": str(port),
        "BERTSERVE_API_WORKERS": str(request.param),
        "BERTSERVE_WARMUP_RUNS": "0",
        "PYTHONPATH": "",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BERTSERVE_", "VIRTUAL_ENV", "PYTHON"))}
    log = service_only / f"server-{request.param}.log"
    srv = start_server(argv, port, log, env={**clean, **env}, cwd=service_only, inherit=False)
    yield srv
    assert srv.stop() == 0, srv.logs()


def test_the_server_starts_and_serves_http_and_grpc_with_only_the_image_dependencies(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/predict", json={"inputs": ["a great film", "awful"]}, timeout=30)
    assert response.status_code == 200, response.text
    grpc_port = int(server.url.rsplit(":", 1)[1]) + 1
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        text = triton_grpc.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"a great film"], dtype=object))
        assert client.infer("tiny", [text]).as_numpy("logits").shape == (1, 3)
    finally:
        client.close()
