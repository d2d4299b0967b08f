"""Fixtures for the deployment tests (the `tiny_bundle` fixture comes from tests/conftest.py).

The container fixtures build once per session, with the README's commands, and note what they measured in
REPORT, which the terminal summary prints (build times, image sizes, readiness, drain counts).
"""

from __future__ import annotations

import pytest
from containers import CPU_BUILD, CPU_IMAGE, REPORT, SETUP_COMMANDS, engine_available, image_size, shell
from deploy_support import system_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return system_tool("promtool", "apt-get install -y prometheus")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return system_tool("prometheus", "apt-get install -y prometheus")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return system_tool("kubectl", "kubectl with its built-in kustomize")


@pytest.fixture(scope="session")
def stand_in_images() -> None:
    """A docker engine and the stand-in base images (scripts/container-engine.sh, scripts/stand-in-images.sh)."""
    engine_available()
    for command in SETUP_COMMANDS:
        REPORT[command] = f"{shell(command, timeout=600):.0f} s"


@pytest.fixture(scope="session")
def cpu_image(stand_in_images: None) -> str:
    """The CPU image, built from the unmodified Dockerfile with the legacy builder, as the README says."""
    REPORT["cpu image build"] = f"{shell(CPU_BUILD, timeout=600):.0f} s"
    REPORT["cpu image size"] = f"{image_size(CPU_IMAGE) / 1e6:.0f} MB"
    return CPU_IMAGE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("containers")
        for key, value in REPORT.items():
            terminalreporter.write_line(f"{key}: {value}")
