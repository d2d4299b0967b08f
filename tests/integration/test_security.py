"""Authentication and code-safety: the API key guards predict, v2 infer and admin; probes are open by default and
closed by BERTSERVE_AUTH_ALL; nothing in service/ deserializes pickles, evaluates code or trusts remote code.

The key checks run against a real server over HTTP, including the real ``tritonclient.http`` client with and
without the header. (That the container runs as non-root is checked by tests/deploy.)
"""

from __future__ import annotations

import ast
import contextlib
import hmac
import ipaddress
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from pydantic import SecretStr
from tritonclient.utils import InferenceServerException

from service.errors import Unauthorized
from service.frontend import kit
from tests.integration.conftest import free_port, service_command

REPO = Path(__file__).resolve().parents[2]
KEY = "s3cret-Key_0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
PREDICT = ("POST", "/v1/predict", {"inputs": ["a great film", "awful"]})
V2_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a great film"]}]}
PROTECTED = [
    PREDICT,
    ("POST", "/v2/models/tiny/infer", V2_BODY),
    ("POST", "/v2/models/tiny/versions/1/infer", V2_BODY),
    ("POST", "/v1/admin/reload", {}),
]
OPEN_BY_DEFAULT = ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]
WRONG_AUTH = {
    "missing": {},
    "wrong key": {"authorization": "Bearer not-the-key"},
    "key prefix": {"authorization": f"Bearer {KEY[:-1]}"},
    "key plus suffix": {"authorization": f"Bearer {KEY}x"},
    "bearer without token": {"authorization": "Bearer"},
    "no scheme": {"authorization": KEY},
    "basic scheme": {"authorization": f"Basic {KEY}"},
    "other header": {"x-api-key": KEY},
    "non-ascii key": {"authorization": "Bearer s\u00e9cret"},
}


def assert_unauthorized(r: httpx.Response, what: str) -> None:
    assert r.status_code == 401, f"{what}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), f"{what}: {dict(r.headers)}"
    body = r.json()
    assert set(body) == {"error", "type", "request_id"} and body["type"] == "unauthorized", f"{what}: {body}"
    assert KEY not in r.text


def _request(client: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    encoded = {k: v.encode("utf-8") for k, v in headers.items()}  # lets the non-ASCII case through h11
    return client.request(method, path, json=body, headers=encoded)


def test_api_key_guards_predict_v2_infer_and_admin(start_server: Any) -> None:
    server = start_server(api_key=KEY)
    unauthorized = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path, body in PROTECTED:
            for name, headers in WRONG_AUTH.items():
                assert_unauthorized(_request(client, method, path, body, headers), f"{path} with {name}")
                unauthorized += 1
            # the key in a query string is not a credential
            r = client.request(method, path, json=body, params={"api_key": KEY, "token": KEY})
            assert_unauthorized(r, f"{path} with the key in the query string")
            unauthorized += 1
            for scheme in ("Bearer", "bearer", "BEARER"):
                r = client.request(method, path, json=body, headers={"authorization": f"{scheme} {KEY}"})
                assert r.status_code == 200, f"{path} with '{scheme} <key>': {r.status_code} {r.text[:300]}"
        # predictions really came back with the key
        r = client.post("/v1/predict", json={"inputs": "a great film"}, headers=AUTH)
        assert r.json()["predictions"][0][0]["label"] in {"negative", "neutral", "positive"}
        # probes, metrics and metadata stay open by default
        for path in [*OPEN_BY_DEFAULT, "/v1/models", "/v2", "/v2/models/tiny", "/v2/models/tiny/ready"]:
            assert client.get(path).status_code == 200, path
    rejected = server.metric("bertserve_rejected_total", {"reason": "unauthorized"})
    assert rejected == unauthorized
    assert KEY not in server.log(), "the API key was written to the log"


def test_tritonclient_needs_the_key(start_server: Any) -> None:
    import tritonclient.http as triton

    server = start_server(api_key=KEY)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    inp = triton.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([b"a great film", b"terrible"], dtype=object))
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer("tiny", [inp])
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer("tiny", [inp], headers={"Authorization": "Bearer wrong"})
    result = client.infer("tiny", [inp], headers={"Authorization": f"Bearer {KEY}"})
    assert result.as_numpy("logits").shape == (2, 3)
    assert client.is_server_ready()  # readiness stays open by default


def test_auth_all_closes_health_readiness_and_metrics(start_server: Any) -> None:
    server = start_server(wait_ready=False, api_key=KEY, auth_all="true")
    server.client.headers.update(AUTH)  # the fixture's readiness poll must carry the key now
    server.wait("/readyz")
    still_open = []
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in OPEN_BY_DEFAULT:
            r = anonymous.get(path)
            if r.status_code != 401:
                still_open.append(f"{path} -> {r.status_code}")
                continue
            assert_unauthorized(r, path)
            wrong = anonymous.get(path, headers={"authorization": "Bearer nope"})
            assert_unauthorized(wrong, f"{path} with a wrong key")
        for path in OPEN_BY_DEFAULT:
            assert anonymous.get(path, headers=AUTH).status_code == 200, path
        assert_unauthorized(anonymous.post("/v1/predict", json={"inputs": "a"}), "predict")
    assert not still_open, f"BERTSERVE_AUTH_ALL=true left health/readiness endpoints open: {still_open}"


def test_every_key_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are compared with hmac.compare_digest (its timing does not leak the key): every check goes through it,
    the wrong key and the right one alike."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(kit.hmac, "compare_digest", spy)
    with pytest.raises(Unauthorized):
        kit.check_token("Bearer wrong-key", SecretStr("right-key"))
    kit.check_token("Bearer right-key", SecretStr("right-key"))
    assert seen == [(b"wrong-key", b"right-key"), (b"right-key", b"right-key")]


# -- the code itself -----------------------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_ATTRS = {
    ("torch", "load"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("numpy", "load"),
    ("np", "load"),
    ("pickle", "loads"),
    ("pickle", "load"),
}


def _python_files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def _unsafe_uses(path: Path, root: Path = REPO) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    name = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_CALLS:
                found.append(f"{where} {func.id}(...)")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in UNSAFE_ATTRS:
                    found.append(f"{where} {func.value.id}.{func.attr}(...)")
                if func.attr == "create_subprocess_shell" or (func.value.id == "os" and func.attr == "system"):
                    found.append(f"{where} {func.value.id}.{func.attr}(...)")
            for kw in node.keywords:
                if kw.arg == "trust_remote_code":
                    found.append(f"{where} trust_remote_code=...")
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} allow_pickle=...")
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} shell=...")
    if "trust_remote_code" in source and not any("trust_remote_code" in f for f in found):
        found.append(f"{name} mentions trust_remote_code")
    return found


def test_service_has_no_pickle_eval_or_remote_code() -> None:
    found = [use for path in _python_files("service") for use in _unsafe_uses(path)]
    assert not found, "unsafe deserialization or code execution in service/:\n" + "\n".join(found)


def test_training_never_trusts_remote_code() -> None:
    """Training loads Hugging Face checkpoints: remote code in a model repo must never run."""
    found = [use for path in _python_files("training") for use in _unsafe_uses(path) if "trust_remote_code" in use]
    assert not found, "\n".join(found)


def test_the_scanner_catches_what_it_looks_for(tmp_path: Path) -> None:
    """The scan above must be able to fail: planted uses are all reported."""
    planted = tmp_path / "service" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(
        "import pickle\nfrom marshal import loads\nimport yaml, torch, subprocess\n"
        "eval('1')\nexec('x = 1')\ntorch.load('m.pt')\nyaml.load('a')\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\nsubprocess.run('ls', shell=True)\n"
    )
    found = _unsafe_uses(planted, root=tmp_path)
    assert len(found) == 8, found


ADMIN = "adm1n-Key_fedcba9876543210"
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


def test_the_admin_key_alone_reaches_the_repository_and_both_keys_come_from_files(
    start_server: Any, tmp_path: Path, tiny_bundle: Path
) -> None:
    """Triton restricts its model-repository API; so does BERTSERVE_ADMIN_API_KEY: an inference client cannot
    list, load or unload models (HTTP or gRPC), and the admin key is no inference key. Keys are read from files
    (as Docker and Kubernetes mount secrets), with the trailing newline those files usually have."""
    repository = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repository / "tiny" / "1")
    (tmp_path / "key").write_text(KEY + "\n")
    (tmp_path / "admin").write_text(ADMIN + "\n")
    grpc_port = free_port()
    server = start_server(
        model_repository=repository,
        api_key_file=tmp_path / "key",
        admin_api_key_file=tmp_path / "admin",
        grpc_port=grpc_port,
    )
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in ("/v2/repository/index", "/v2/repository/models/tiny/unload", "/v2/repository/models/tiny/load"):
            assert_unauthorized(client.post(path, headers=AUTH), f"{path} with the inference key")
        assert_unauthorized(client.post("/v1/predict", json={"inputs": "x"}, headers=ADMIN_AUTH), "predict, admin key")
        assert client.post("/v1/predict", json={"inputs": "x"}, headers=AUTH).status_code == 200
        index = client.post("/v2/repository/index", headers=ADMIN_AUTH)
        assert index.status_code == 200 and index.json()[0]["name"] == "tiny", index.text
    stub = triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as refused:
            stub.unload_model("tiny", headers=AUTH)
        assert refused.value.status() == str(grpc.StatusCode.UNAUTHENTICATED)
        stub.unload_model("tiny", headers=ADMIN_AUTH)
        stub.load_model("tiny", headers=ADMIN_AUTH)
        assert stub.is_model_ready("tiny")
    finally:
        stub.close()
    assert KEY not in server.log() and ADMIN not in server.log()


def test_make_run_listens_on_loopback_for_http_and_grpc(tmp_path: Path, tiny_bundle: Path) -> None:
    """The README's `make run`, as make would run it (its serve command, on the test bundle): HTTP and gRPC
    listen on loopback only; BERTSERVE_HOST=0.0.0.0 is how an operator asks for more."""
    port, grpc_port = free_port(), free_port()
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", f"MODEL_DIR={tiny_bundle}", f"PORT={port}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    cmd = shlex.split(dry.stdout.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "service"] and "--host" not in cmd, cmd
    _, env = service_command(tiny_bundle, port, grpc_port=grpc_port)
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        listening = [c.laddr for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"]
        assert sorted(a.port for a in listening) == sorted((port, grpc_port)), listening
        for address in listening:
            ip = ipaddress.ip_address(address.ip)
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # gRPC's ::ffff:127.0.0.1
            assert (mapped or ip).is_loopback, f"listening on {address.ip}:{address.port}, not loopback"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
