"""Fixtures for the deployment tests (the `tiny_bundle` fixture comes from tests/conftest.py)."""

from __future__ import annotations

import pytest
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
