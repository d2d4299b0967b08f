"""k8s/kserve: the ServingRuntime and InferenceService render with kustomize and validate offline against KServe's
CRD fields (crd_schemas.py), their Kubernetes core parts (containers, volumes) against the Kubernetes schema; the
two agree with each other and with the service's settings. test_container_k8s.py runs the runtime's container."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import CRD_SCHEMAS, KSERVE_MODEL_FIELDS
from deploy_support import K8S, kustomize, one

from service.config import Settings

K8S_VERSION = "1.37"


@pytest.fixture(scope="module")
def objects(kubectl: str) -> list[dict[str, Any]]:
    return kustomize(K8S / "kserve")


def as_pod(containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": containers, "volumes": volumes},
    }


def validate(obj: dict[str, Any]) -> None:
    """The custom resource against its schema, then its core parts as the Pod KServe would make of them."""
    jsonschema.validate(obj, CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])], cls=jsonschema.Draft202012Validator)
    spec = obj["spec"]
    if obj["kind"] == "ServingRuntime":
        kubernetes_validate.validate(as_pod(spec["containers"], spec.get("volumes", [])), K8S_VERSION, strict=True)
    else:
        model = {k: v for k, v in spec["predictor"]["model"].items() if k not in KSERVE_MODEL_FIELDS.split()}
        kubernetes_validate.validate(as_pod([{"name": "kserve-container", **model}], []), K8S_VERSION, strict=True)


def test_the_kserve_objects_validate(objects: list[dict[str, Any]]) -> None:
    assert sorted(o["kind"] for o in objects) == ["InferenceService", "ServingRuntime"]
    for obj in objects:
        validate(obj)


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        ("ServingRuntime", ("spec",), {"protocolVersion": ["v2"]}),
        ("ServingRuntime", ("spec", "supportedModelFormats", 0), {"auto_select": True}),
        ("ServingRuntime", ("spec", "containers", 0, "securityContext"), {"readOnlyRootFileSystem": True}),
        ("InferenceService", ("spec", "predictor"), {"minReplica": 1}),
        ("InferenceService", ("spec", "predictor", "model"), {"storageURI": "pvc://x/y"}),
    ],
)
def test_a_misspelt_field_is_rejected(
    objects: list[dict[str, Any]], kind: str, path: tuple[Any, ...], bad: dict
) -> None:
    obj = yaml.safe_load(yaml.safe_dump(one(objects, kind)))
    node = obj
    for key in path:
        node = node[key]
    node.update(bad)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(obj)


def test_the_inference_service_selects_the_runtime(objects: list[dict[str, Any]]) -> None:
    runtime = one(objects, "ServingRuntime")
    model = one(objects, "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def runtime_settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The runtime container's BERTSERVE_* environment as the pod gets it: KServe fills in {{.Name}}."""
    name = one(objects, "InferenceService")["metadata"]["name"]
    env = one(objects, "ServingRuntime")["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"].replace("{{.Name}}", name) for e in env}


def test_the_runtime_environment_is_valid_settings_on_kserves_ports(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = runtime_settings(objects)
    known = {f"BERTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert str(settings.model_dir) == "/mnt/models", "KServe's storage initializer writes the model there"
    assert settings.port == 8080, "KServe sends HTTP to the runtime's port 8080"
    runtime = one(objects, "ServingRuntime")
    container = runtime["spec"]["containers"][0]
    grpc = [p for p in container["ports"] if p["name"] == "h2c"]
    assert [p["containerPort"] for p in grpc] == [settings.grpc_listen_port], "grpc-v2 goes to the h2c port"
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.port)
    assert container["readinessProbe"]["httpGet"]["port"] == settings.port
