"""The training image runs the Job's pod as Kubernetes would, not only as text: k8s/training/Dockerfile is built
with the command it gives (the context is what git tracks at HEAD), then two containers, one per "machine", run
the Job's own torchrun + fit command line with the pod's uid and gid, a read-only root with the /tmp and /dev/shm
emptyDirs, capabilities dropped, and one shared /data volume. On a network made for the test each has its Indexed
pod's hostname and the headless Service's name for it, so they meet at the Job's own rendezvous endpoint; they
train on a tiny CSV shard, and the rank on machine 0 writes a bundle the service loads.

What the Job's command line leaves to a real cluster is narrowed by flags appended after it (fit's parser keeps
the last value): a tiny random BERT as the base model, 4 steps, a short max length. torch comes from PyPI in a
real build (its Linux wheel carries CUDA); here pip takes this machine's CPU wheel from a loopback mirror
(``--build-arg PIP_FIND_LINKS``), which the Dockerfile documents for CPU-only clusters.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from containers import (
    PYTHON_BASE,
    REPORT,
    Container,
    docker,
    image_size,
    network,
    run_container,
    security_options,
    shell,
)
from deploy_support import K8S, free_port, kustomize, one

from service.bundle import load_bundle
from training.tiny import tiny_dataset, write_rows, write_tiny_base_model

pytestmark = pytest.mark.slow

TRAIN_IMAGE = "bertserve-train:0.1.0"
UID = 10001


def build_command(mirror: str) -> str:
    """The Dockerfile's build line (the files git tracks at HEAD as the context), with the stand-in base and the
    CPU torch mirror as build arguments."""
    return (
        "set -o pipefail; git archive HEAD pyproject.toml README.md service training k8s/training/Dockerfile"
        " | DOCKER_BUILDKIT=0 docker build --network host -f k8s/training/Dockerfile"
        f" --build-arg PYTHON_IMAGE={PYTHON_BASE} --build-arg PIP_FIND_LINKS={mirror} -t {TRAIN_IMAGE} -"
    )


@contextlib.contextmanager
def torch_mirror(tmp: Path) -> Iterator[str]:
    """A loopback find-links page holding the torch wheel pip on this machine installs (a CPU build)."""
    wheels = tmp / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "torch==2.13.0", "-d", str(wheels)],
        check=True,
        timeout=300,
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(wheels)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def train_image(stand_in_images: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    with torch_mirror(tmp_path_factory.mktemp("mirror")) as mirror:
        REPORT["training image build"] = f"{shell(build_command(mirror), timeout=900):.0f} s"
    REPORT["training image size"] = f"{image_size(TRAIN_IMAGE) / 1e6:.0f} MB"
    return TRAIN_IMAGE


def pod_options(pod: dict[str, Any], data: Path) -> list[str]:
    """`docker run` options for what the Job's pod spec asks of the container runtime."""
    (main,) = pod["containers"]
    options = security_options(pod)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in main["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "persistentVolumeClaim" in volume:
            options.append(f"--volume={data}:{mount['mountPath']}")
        elif mount["mountPath"] == "/dev/shm":
            options.append(f"--shm-size={volume['emptyDir']['sizeLimit'].replace('Gi', 'g')}")
        else:
            options.append(f"--tmpfs={mount['mountPath']}:uid={UID},gid={UID}")
    options += [f"--env={e['name']}={e['value']}" for e in main.get("env", [])]
    return options


def node_args(main: dict[str, Any]) -> list[str]:
    """The Job's torchrun + fit arguments, unchanged, with the tiny recipe appended."""
    tiny = ["--base-model=/data/base", "--max-steps=4", "--max-length=32", "--num-proc=1", "--threads=1"]
    return [*main["args"], *tiny, "--checkpoint-every=2"]


@pytest.fixture(scope="module")
def trained(train_image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Both machines' containers run the Job to the end; the shared volume and each container's log."""
    job = one(kustomize(K8S / "training"), "Job", "bertserve-train")
    pod = job["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    data = tmp_path_factory.mktemp("volume")
    (data / "input").mkdir()  # the Job's --data: a directory of shards
    write_rows(data / "input" / "part-0.csv", ["text", "label"], tiny_dataset(n_per_class=40, seed=0))
    write_tiny_base_model(data / "base", seed=0)
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(data)], check=True)  # the pod's fsGroup
    args = node_args(main)
    hostnames = [f"{job['metadata']['name']}-{i}" for i in range(job["spec"]["completions"])]  # Indexed pods'
    started = time.monotonic()
    machines: list[Container] = []
    with network(f"bertserve-train-test-{os.getpid()}") as net:
        try:
            for hostname in hostnames:
                # the pod's DNS name through the headless Service: <hostname>.<subdomain>
                alias = f"{hostname}.{pod['subdomain']}"
                identity = [f"--network={net}", f"--hostname={hostname}", f"--network-alias={alias}"]
                machines.append(run_container(train_image, [*identity, *pod_options(pod, data)], args))
            codes = []
            for machine in machines:  # a run that hangs (a rendezvous nobody hosts) fails with what it printed
                try:
                    codes.append(int(docker("wait", machine.id, timeout=300).strip()))
                except subprocess.TimeoutExpired:
                    codes.append(-1)
            printed = [machine.logs() for machine in machines]
        finally:
            for machine in machines:
                machine.remove()
    REPORT["training Job, 2 containers x 1 process, 4 steps"] = f"{time.monotonic() - started:.0f} s"
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in printed)
    return data, printed


def test_two_machines_run_the_jobs_command_line_to_a_bundle_the_service_loads(
    trained: tuple[Path, list[str]],
) -> None:
    data, printed = trained
    bundle = load_bundle(data / "models" / "classifier")  # verifies the manifest and every checksum
    run = bundle.manifest.training_run
    assert run is not None and (run.world_size, run.nodes, run.device_type) == (2, 2, "cpu")
    assert run.precision == "bf16" and run.global_batch == 64
    # with a read-only root, everything else the Job asks for is on the shared volume
    assert any((data / "checkpoints" / "classifier").glob("step-*")), "no checkpoint"
    assert any((data / "cache").iterdir()), "no prepared-data cache"
    assert any((data / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert all("Traceback" not in log for log in printed), "\n\n".join(log[-3000:] for log in printed)
