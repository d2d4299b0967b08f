"""The Kubernetes Deployment checked against the image it runs, not only against a schema: the CPU image is
started the way the cpu overlay's pod would start it (its ConfigMap environment, its uid and gid, read-only root
with the /tmp emptyDir, capabilities dropped, no privilege escalation, the model at /models) on a network made
for this test, and the manifest's probes, container ports and termination budget are tried on that container.

No kubelet runs here: the CPU limit (more cores than this machine has) and the preStop sleep are the two things
the container engine cannot apply; the termination budget is what is left of the grace period after preStop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from containers import REPORT, Container, network, running, security_options
from deploy_support import K8S, kustomize, one

pytestmark = pytest.mark.slow


@dataclass
class Pod:
    container: Container
    spec: dict[str, Any]  # the pod template's spec
    address: str

    @property
    def main(self) -> dict[str, Any]:
        return dict(self.spec["containers"][0])

    def port(self, name: str) -> int:
        return int(next(p["containerPort"] for p in self.main["ports"] if p["name"] == name))


def pod_options(objects: list[dict[str, Any]], bundle: Path) -> list[str]:
    """`docker run` options for what the cpu overlay's pod spec asks of the container runtime."""
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    main = spec["containers"][0]
    options = security_options(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in main["volumeMounts"]:
        assert "emptyDir" in volumes[mount["name"]], mount  # the only volume kind the base mounts
        options.append(f"--tmpfs={mount['mountPath']}")
    for source in main["envFrom"]:
        options += [
            f"--env={k}={v}" for k, v in one(objects, "ConfigMap", source["configMapRef"]["name"])["data"].items()
        ]
    options.append(f"--volume={bundle}:/models:ro")  # what the model-pvc component mounts
    return options


@pytest.fixture(scope="module")
def pod(cpu_image: str, tiny_bundle: Path, kubectl: str) -> Iterator[Pod]:
    objects = kustomize(K8S / "overlays" / "cpu")
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    with (
        network(f"bertserve-k8s-test-{os.getpid()}") as net,
        running(cpu_image, [f"--network={net}", *pod_options(objects, tiny_bundle)]) as container,
    ):
        yield Pod(container, spec, container.address())


def test_the_image_user_is_the_pods_numeric_non_root_user(pod: Pod) -> None:
    security = pod.spec["securityContext"]
    assert security["runAsNonRoot"] is True
    user = pod.container.inspect()["Config"]["User"]  # runAsNonRoot can only verify a numeric USER
    assert user == f"{security['runAsUser']}:{security['runAsGroup']}", user
    assert pod.container.exec("id", "-u").strip() == str(security["runAsUser"])


def test_every_probe_answers_200_on_its_port_once_ready(pod: Pod) -> None:
    probes = {name: pod.main[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    startup = probes["startupProbe"]
    url = f"http://{pod.address}:{pod.port(startup['port'])}"
    ready_s = pod.container.wait_ready(url, timeout=60)
    budget = pod.main["startupProbe"]["periodSeconds"] * pod.main["startupProbe"]["failureThreshold"]
    assert ready_s < budget
    REPORT["k8s pod settings: ready"] = f"{ready_s:.1f} s (startup probe allows {budget} s)"
    for name, get in probes.items():
        response = httpx.get(f"http://{pod.address}:{pod.port(get['port'])}{get['path']}", timeout=5)
        assert response.status_code == 200, (name, get, response.text)


def test_the_container_ports_are_where_the_server_listens(pod: Pod) -> None:
    pod.container.wait_ready(f"http://{pod.address}:{pod.port('http')}", timeout=60)
    response = httpx.post(f"http://{pod.address}:{pod.port('http')}/v1/predict", json={"inputs": "great"}, timeout=30)
    assert response.status_code == 200, response.text
    client = triton_grpc.InferenceServerClient(f"{pod.address}:{pod.port('grpc')}")
    try:
        assert client.is_server_ready()
        text = triton_grpc.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"great"], dtype=object))
        assert client.infer("tiny", [text]).as_numpy("logits").shape == (1, 3)
    finally:
        client.close()


def test_the_container_stops_with_exit_0_inside_the_grace_period_after_prestop(pod: Pod) -> None:
    pod.container.wait_ready(f"http://{pod.address}:{pod.port('http')}", timeout=60)
    budget = pod.spec["terminationGracePeriodSeconds"] - pod.main["lifecycle"]["preStop"]["sleep"]["seconds"]
    started = time.monotonic()
    code, elapsed = pod.container.stop(budget)
    REPORT["k8s pod settings: stop"] = f"exit {code} after {elapsed:.1f} s (budget after preStop {budget} s)"
    assert code == 0, pod.container.logs()[-4000:]
    assert time.monotonic() - started < budget


def test_the_kserve_runtime_serves_the_inference_service_as_kserve_runs_it(
    cpu_image: str, tiny_bundle: Path, kubectl: str
) -> None:
    """k8s/kserve's ServingRuntime container, its environment filled in as KServe fills it ({{.Name}}), the model
    where the storage initializer puts it: ready on its readiness probe, the v2 model named after the
    InferenceService over HTTP (8080) and gRPC (the h2c port), metrics where its annotations point."""
    objects = kustomize(K8S / "kserve")
    runtime, isvc = one(objects, "ServingRuntime"), one(objects, "InferenceService")
    name = isvc["metadata"]["name"]
    main = runtime["spec"]["containers"][0]
    security = main["securityContext"]
    options = [
        f"--user={security['runAsUser']}:{security['runAsGroup']}",
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges:true",
        "--tmpfs=/tmp",
        f"--volume={tiny_bundle}:/mnt/models:ro",
        *[f"--env={e['name']}={e['value'].replace('{{.Name}}', name)}" for e in main["env"]],
    ]
    with (
        network(f"bertserve-kserve-test-{os.getpid()}") as net,
        running(cpu_image, [f"--network={net}", *options]) as container,
    ):
        address = container.address()
        probe = main["readinessProbe"]["httpGet"]
        base = f"http://{address}:{probe['port']}"
        container.wait_ready(base, timeout=60)
        assert httpx.get(f"{base}{probe['path']}", timeout=5).status_code == 200
        infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a great film"]}]}
        response = httpx.post(f"{base}/v2/models/{name}/infer", json=infer, timeout=30)
        assert response.status_code == 200 and response.json()["model_name"] == name, response.text
        h2c = next(p["containerPort"] for p in main["ports"] if p["name"] == "h2c")
        client = triton_grpc.InferenceServerClient(f"{address}:{h2c}")
        try:
            assert client.is_model_ready(name)
        finally:
            client.close()
        annotations = runtime["spec"]["annotations"]
        metrics = (
            f"http://{address}:{annotations['prometheus.kserve.io/port']}{annotations['prometheus.kserve.io/path']}"
        )
        assert "bertserve_requests_total" in httpx.get(metrics, timeout=5).text
