"""requirements/service.lock pins every runtime dependency of the service, within pyproject.toml's ranges."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements" / "service.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for text in dependencies:
        requirement = Requirement(text)
        name = _canonical(requirement.name)
        assert name in pins, f"{name} is not in requirements/service.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]} outside {requirement.specifier}: run `make lock`"
        )
