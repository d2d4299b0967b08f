"""The container engine as the deployment tests drive it: the docker CLI and Docker Compose v2, the commands the
README's "Deploy" section gives (one constant each, and a test checks the README shows them verbatim), and a
running container with what the tests read from it.

Containers use host networking on free loopback ports, or a network the test creates (and removes) on this
machine; nothing is sent anywhere else. Without an engine the tests skip and say why, except where
BERTSERVE_REQUIRE_CONTAINERS=1 (CI), where a missing engine is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx
import pytest
from deploy_support import REPO

STATE = REPO / "build" / "container"
PYTHON_BASE = "bertserve-stand-in/python:3.11-bookworm"
PROMETHEUS_IMAGE = "bertserve-stand-in/prometheus:debian"
CPU_IMAGE = "bertserve:cpu"
GPU_IMAGE = "bertserve:gpu-python"

# The commands README's "Deploy" gives, exactly (test_container_image.py checks it shows them); GPU_BUILD is in
# docs/DEPLOY.md (opt-in: make image-gpu-check).
SETUP_COMMANDS = ("./scripts/container-engine.sh", "./scripts/stand-in-images.sh")
CPU_BUILD = (
    f"DOCKER_BUILDKIT=0 docker build --network host --target cpu --build-arg PYTHON_IMAGE={PYTHON_BASE} "
    f"-t {CPU_IMAGE} ."
)
GPU_BUILD = (
    f"DOCKER_BUILDKIT=0 docker build --network host --target gpu --build-arg PYTHON_IMAGE={PYTHON_BASE} "
    f"--build-arg CUDA_IMAGE={PYTHON_BASE} -t {GPU_IMAGE} ."
)
COMPOSE_UP = f"PROMETHEUS_IMAGE={PROMETHEUS_IMAGE} docker compose --profile cpu up -d bertserve-cpu prometheus"

REQUIRED = os.environ.get("BERTSERVE_REQUIRE_CONTAINERS") == "1"
REPORT: dict[str, str] = {}  # what the container tests measured, printed in pytest's terminal summary


def unavailable(reason: str) -> NoReturn:
    if REQUIRED:
        pytest.fail(f"BERTSERVE_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(reason)


def docker(*args: str, timeout: float = 120, check: bool = True, env: Mapping[str, str] | None = None) -> str:
    """Run the docker CLI; its stdout. A failure shows the command and what it printed."""
    proc = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        output = proc.stdout[-3000:] + proc.stderr[-3000:]
        raise AssertionError(f"docker {' '.join(args)} -> {proc.returncode}\n{output}")
    return proc.stdout


def shell(command: str, timeout: float, env: Mapping[str, str] | None = None) -> float:
    """Run one of the README's command lines from the repository root; the seconds it took."""
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{command}\n-> {proc.returncode}\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
    return time.monotonic() - started


def engine_available() -> None:
    """Skip (or fail in CI) unless a docker engine answers."""
    if shutil.which("docker") is None:
        unavailable("no docker CLI (scripts/container-engine.sh installs Debian's docker.io as root)")
    try:
        docker("info", timeout=20)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        unavailable(f"no docker engine answers (scripts/container-engine.sh starts one as root): {exc}")


def compose_argv() -> list[str]:
    """Docker Compose v2: the docker CLI plugin, or the binary scripts/container-engine.sh unpacked."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    local = STATE / "docker-compose"
    if local.is_file():
        return [str(local)]
    unavailable("no Docker Compose v2 (scripts/container-engine.sh unpacks one)")


def image_size(image: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", image).strip())


@dataclass
class Container:
    """A started container, by id."""

    id: str
    started: float = field(default_factory=time.monotonic)

    def inspect(self) -> dict[str, Any]:
        return dict(json.loads(docker("inspect", self.id))[0])

    def logs(self) -> str:
        proc = subprocess.run(["docker", "logs", self.id], capture_output=True, text=True, timeout=30, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *argv: str) -> str:
        return docker("exec", self.id, *argv, timeout=60)

    def exec_status(self, *argv: str) -> int:
        return subprocess.run(
            ["docker", "exec", self.id, *argv], capture_output=True, timeout=60, check=False
        ).returncode

    def address(self) -> str:
        """The container's IP address on its (only) bridge network."""
        networks = self.inspect()["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    def wait_ready(self, url: str, timeout: float = 60.0, headers: Mapping[str, str] | None = None) -> float:
        """Seconds from start until GET {url}/readyz answered 200."""
        deadline = self.started + timeout
        with httpx.Client(timeout=2.0, headers=dict(headers or {})) as client:
            while time.monotonic() < deadline:
                state = self.inspect()["State"]
                assert state["Running"], f"container exited with {state['ExitCode']}:\n{self.logs()[-4000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/readyz").status_code == 200:
                        return time.monotonic() - self.started
                time.sleep(0.25)
        raise AssertionError(f"not ready within {timeout:.0f} s:\n{self.logs()[-4000:]}")

    def wait_health(self, want: str = "healthy", timeout: float = 60.0) -> float:
        """Seconds from start until Docker's HEALTHCHECK status is `want`."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.inspect()["State"].get("Health") or {}
            if health.get("Status") == want:
                return time.monotonic() - self.started
            assert time.monotonic() < deadline, f"health {health.get('Status')!r}, wanted {want!r}: {health}"
            time.sleep(0.5)

    def stop(self, grace_s: int) -> tuple[int, float]:
        """`docker stop -t grace_s` (SIGTERM, SIGKILL after grace_s): the exit code and the seconds it took."""
        started = time.monotonic()
        docker("stop", "-t", str(grace_s), self.id, timeout=grace_s + 30)
        elapsed = time.monotonic() - started
        return int(self.inspect()["State"]["ExitCode"]), elapsed

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.id, check=False)


def run_container(image: str, options: Sequence[str] = (), command: Sequence[str] = ()) -> Container:
    return Container(docker("run", "-d", *options, image, *command).strip())


@contextlib.contextmanager
def running(image: str, options: Sequence[str] = (), command: Sequence[str] = ()) -> Iterator[Container]:
    """A container for the block's duration; its log is printed when the block fails."""
    container = run_container(image, options, command)
    try:
        yield container
    except BaseException:
        print(f"--- logs of {image} ({container.id[:12]}):\n{container.logs()[-6000:]}")
        raise
    finally:
        container.remove()


def security_options(pod: Mapping[str, Any]) -> list[str]:
    """`docker run` options for a pod spec's security contexts (its first container): the uid and gid, a
    read-only root, dropped capabilities, no privilege escalation."""
    pod_security, security = pod["securityContext"], pod["containers"][0]["securityContext"]
    options = [f"--user={pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    options += [f"--cap-drop={cap}" for cap in security["capabilities"]["drop"]]
    if security.get("allowPrivilegeEscalation") is False:
        options.append("--security-opt=no-new-privileges:true")
    return options


@contextlib.contextmanager
def network(name: str) -> Iterator[str]:
    """An internal bridge network made for one test (no route off this machine); removed afterwards."""
    docker("network", "rm", name, check=False)
    docker("network", "create", "--internal", name)
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free loopback ports (HTTP, then gRPC = HTTP + 1)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError("no run of free ports found")
