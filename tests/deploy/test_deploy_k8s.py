"""k8s/: `kubectl kustomize` builds every overlay, alone and with the optional components switched on the way a
user switches them on (listed in the overlay), and every rendered object validates offline: built-in kinds
against the Kubernetes OpenAPI schema (kubernetes-validate, strict), custom resources against crd_schemas.py.
Then what no schema knows: probes, the drain budget, security, GPU scheduling, selectors and references."""

from __future__ import annotations

import itertools
import re
import shutil
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import CRD_SCHEMAS
from deploy_support import (
    COMPONENTS,
    DEPLOY,
    K8S,
    OVERLAYS,
    REPO,
    find,
    image_argv,
    image_settings,
    kustomize,
    one,
    parse_dockerfile,
)

from service.config import Settings

K8S_VERSION = "1.37"  # the newest schema kubernetes-validate ships; the manifests use nothing newer than 1.30
BUILDS = [(overlay, ()) for overlay in OVERLAYS] + [(overlay, COMPONENTS) for overlay in OVERLAYS]
NAMESPACED_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "ServiceMonitor",
    "PrometheusRule",
    "ScaledObject",
}


def build_id(build: tuple[str, tuple[str, ...]]) -> str:
    overlay, components = build
    return overlay + ("+all-components" if components else "")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Every build, rendered once. Components are enabled in a copy of k8s/, by listing them in the overlay."""
    out: dict[str, list[dict[str, Any]]] = {}
    for overlay, components in BUILDS:
        if not components:
            out[build_id((overlay, components))] = kustomize(K8S / "overlays" / overlay)
            continue
        copy = tmp_path_factory.mktemp("k8s") / "k8s"
        shutil.copytree(K8S, copy)
        kustomization = copy / "overlays" / overlay / "kustomization.yaml"
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        spec["components"] = [f"../../components/{c}" for c in components]
        kustomization.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        out[build_id((overlay, components))] = kustomize(copy / "overlays" / overlay)
    return out


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", "bertserve")["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    assert [c["name"] for c in containers] == ["bertserve"]
    return containers[0]


def settings_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    name = container(objects)["envFrom"][0]["configMapRef"]["name"]
    return one(objects, "ConfigMap", name)["data"]


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` does not validate; every kind must have a schema (no silent skip)."""
    schema = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_every_rendered_object_validates_against_its_schema(rendered, build: str) -> None:
    objects = rendered[build]
    assert objects
    errors = []
    for obj in objects:
        try:
            validate(obj)
        except Exception as exc:  # collect all, report all
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {type(exc).__name__}: {exc}"[:600])
    assert not errors, "\n".join(errors)


def test_the_schemas_reject_misspelt_fields(rendered) -> None:
    """Controls: strict validation catches a misplaced field in a built-in kind and in each custom resource."""
    objects = rendered["gpu+all-components"]
    deployment = yaml.safe_load(yaml.safe_dump(one(objects, "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    for kind, path, bad in (
        ("ServiceMonitor", ("spec", "endpoints", 0), {"intervall": "15s"}),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"fore": "5m"}),
        ("ScaledObject", ("spec", "triggers", 0, "metadata"), {"threshold": 64}),
    ):
        obj = yaml.safe_load(yaml.safe_dump(one(objects, kind)))
        node = obj
        for key in path:
            node = node[key]
        node.update(bad)
        with pytest.raises(jsonschema.ValidationError):
            validate(obj)


def test_keda_behavior_is_a_valid_hpa_behavior(rendered) -> None:
    scaled = one(rendered["gpu+all-components"], "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "check"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2, "behavior": behavior},
    }
    kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_everything_lands_in_one_namespace(rendered, build: str) -> None:
    objects = rendered[build]
    namespace = one(objects, "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] == "Namespace":
            continue
        assert obj["kind"] in NAMESPACED_KINDS, f"unexpected kind {obj['kind']}"
        assert obj["metadata"].get("namespace") == namespace, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_container_starts_the_service_like_the_image_and_the_tests(rendered, build: str) -> None:
    c = container(rendered[build])
    overlay = build.split("+")[0]
    stage = parse_dockerfile(REPO / "Dockerfile").stage(overlay)
    # the image's command, configured by its ENV and the ConfigMap: a flag would override the environment
    assert "command" not in c and "args" not in c, c
    assert image_argv(stage) == ["python", "-m", "service"]
    settings = {**image_settings(stage), **settings_of(rendered[build])}
    port = int(settings["BERTSERVE_PORT"])
    grpc = int(settings.get("BERTSERVE_GRPC_PORT", port + 1))
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": port, "grpc": grpc}
    image, _, tag = c["image"].rpartition(":")
    assert image == "bertserve" and tag == overlay, c["image"]


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_probes(rendered, build: str) -> None:
    c = container(rendered[build])
    ports = {p["name"] for p in c["ports"]}
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ports, (probe, get)
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "load + warm-up need minutes"
    assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 20


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_termination_grace_covers_prestop_and_drain(rendered, build: str) -> None:
    from service.config import Settings

    objects = rendered[build]
    spec, c, settings = pod_spec(objects), container(objects), settings_of(objects)
    fields = Settings.model_fields

    def setting(name: str) -> float:
        return float(settings.get(f"BERTSERVE_{name.upper()}", fields[name].default))

    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = pre_stop + setting("drain_delay_s") + setting("drain_timeout_s") + 5
    assert spec["terminationGracePeriodSeconds"] >= budget, (spec["terminationGracePeriodSeconds"], budget)
    assert setting("drain_timeout_s") >= setting("max_request_timeout_s"), "a request may outlive the drain"
    assert pre_stop >= 3, "give endpoint controllers and proxies time to stop routing to the pod"


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_restricted_security_context(rendered, build: str) -> None:
    spec = pod_spec(rendered[build])
    c = container(rendered[build])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert spec["automountServiceAccountToken"] is False
    writable = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in writable, "a read-only root needs a writable /tmp"
    dockerfile_uid = parse_dockerfile(REPO / "Dockerfile").stage("cpu").last("USER").value.split(":")[0]
    assert str(spec["securityContext"]["runAsUser"]) == dockerfile_uid


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_resources_and_threads(rendered, build: str) -> None:
    c = container(rendered[build])
    resources = c["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), (kind, resources)
    settings = settings_of(rendered[build])
    threads = int(settings["BERTSERVE_INTRA_OP_THREADS"])
    workers = int(settings.get("BERTSERVE_INFERENCE_WORKERS", Settings.model_fields["inference_workers"].default))
    cpu_limit = resources["limits"]["cpu"]
    cores = float(cpu_limit[:-1]) / 1000 if str(cpu_limit).endswith("m") else float(cpu_limit)
    # 0 would mean "the node's cores / workers", which oversubscribes a CPU quota; each worker runs its own batch.
    assert 0 < threads * workers <= cores, f"{workers} workers x {threads} threads with a CPU limit of {cpu_limit}"


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_settings_are_real_and_valid(rendered, build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import Settings

    data = settings_of(rendered[build])
    known = {f"BERTSERVE_{name.upper()}" for name in Settings.model_fields}
    assert not set(data) - known, f"not settings (silently ignored): {set(data) - known}"
    for key in [k for k in Settings.model_fields]:
        monkeypatch.delenv(f"BERTSERVE_{key.upper()}", raising=False)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    Settings()


def test_gpu_overlay_schedules_on_gpus_and_requires_cuda(rendered) -> None:
    for build in ("gpu", "gpu+all-components"):
        objects = rendered[build]
        spec, c = pod_spec(objects), container(objects)
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert spec["nodeSelector"], "GPU pods need a GPU node selector"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert settings_of(objects)["BERTSERVE_PROVIDER"] == "cuda"


def test_cpu_overlay_asks_for_no_gpu(rendered) -> None:
    for build in ("cpu", "cpu+all-components"):
        objects = rendered[build]
        text = yaml.safe_dump(one(objects, "Deployment"))
        assert "nvidia" not in text
        assert settings_of(objects)["BERTSERVE_PROVIDER"] == "cpu"
        c = container(objects)
        assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS for steady latency"


@pytest.mark.parametrize("build", [build_id(b) for b in BUILDS])
def test_selectors_and_references_resolve(rendered, build: str) -> None:
    objects = rendered[build]
    deployment = one(objects, "Deployment", "bertserve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(objects)

    def matches(selector: dict[str, str]) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert matches(deployment["spec"]["selector"]["matchLabels"])
    service = one(objects, "Service", "bertserve")
    assert matches(service["spec"]["selector"])
    port_names = {p["name"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    assert matches(one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert one(objects, "ServiceAccount")["metadata"]["name"] == pod_spec(objects)["serviceAccountName"]
    for spread in pod_spec(objects)["topologySpreadConstraints"]:
        assert matches(spread["labelSelector"]["matchLabels"])
    for ref in c["envFrom"]:
        assert find(objects, "ConfigMap", ref["configMapRef"]["name"]), ref

    scalers = find(objects, "HorizontalPodAutoscaler") + find(objects, "ScaledObject")
    assert len(scalers) == 1, "exactly one autoscaler may own the replica count (KEDA replaces the HPA)"
    target = scalers[0]["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "bertserve")
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; apply would reset them"

    for monitor in find(objects, "ServiceMonitor"):
        assert all(
            service["metadata"]["labels"].get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items()
        )
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert all(e["port"] in service_ports for e in monitor["spec"]["endpoints"])
    for pvc in find(objects, "PersistentVolumeClaim"):
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec(objects)["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert pvc["metadata"]["name"] in claims
        assert any(m["mountPath"] == "/models" and m.get("readOnly") for m in c["volumeMounts"])


def _service_metric_names() -> set[str]:
    from service.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",)}.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def test_keda_queries_select_what_the_servicemonitor_scrapes(rendered) -> None:
    from deploy_support import metric_names, selectors

    objects = rendered["gpu+all-components"]
    scaled = one(objects, "ScaledObject")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    job = one(objects, "Service")["metadata"]["name"]  # the ServiceMonitor's job label (no jobLabel set)
    assert "jobLabel" not in one(objects, "ServiceMonitor")["spec"]
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert queries
    known = _service_metric_names()
    for query in queries:
        assert metric_names(query) <= known, f"{query}: unknown metric"
        for _, matchers in selectors(query):
            labels = {label: value.strip('"') for label, op, value in matchers if op == "="}
            assert labels.get("namespace") == namespace and labels.get("job") == job, query


def test_prometheusrule_mirrors_the_compose_alert_rules(rendered) -> None:
    rule = one(rendered["gpu+all-components"], "PrometheusRule")
    compose_rules = yaml.safe_load((DEPLOY / "rules/bertserve.yml").read_text(encoding="utf-8"))
    assert rule["spec"]["groups"] == compose_rules["groups"]


def test_every_overlay_and_component_directory_is_covered() -> None:
    overlays = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    components = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert overlays == set(OVERLAYS), overlays
    assert components == set(COMPONENTS), components
    for path in itertools.chain(
        (K8S / "overlays").glob("*/kustomization.yaml"), (K8S / "components").glob("*/kustomization.yaml")
    ):
        text = path.read_text(encoding="utf-8")
        assert re.search(r"^kind: (Kustomization|Component)$", text, re.M), path
