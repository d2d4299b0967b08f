"""The README documents every setting and every metric the code defines (they drift apart otherwise)."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings
from service.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented_with_its_default() -> None:
    for name, field in Settings.model_fields.items():
        row = next((line for line in README.splitlines() if line.startswith(f"| `BERTSERVE_{name.upper()}`")), None)
        assert row is not None, f"BERTSERVE_{name.upper()} missing from README"
        default = "unset" if field.default is None else str(field.default)
        assert f"`{default}`" in row, f"README default of BERTSERVE_{name.upper()} is not {default}"


def test_every_metric_is_documented() -> None:
    names = {metric.name for metric in Metrics().registry.collect()}
    assert names
    for name in names:
        assert f"`{name}" in README, f"metric {name} missing from README"


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:8])
    assert "make run" in head and "make test" in head
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "make test" in ci
