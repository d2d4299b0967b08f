"""scripts/settings_table.py: one row per Settings field, and --write replaces only the marked section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402  (scripts/ is not a package)

from service.config import Settings  # noqa: E402


def test_one_row_per_field_with_env_flag_and_default() -> None:
    rows = settings_table.settings_table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    assert rows[0].startswith("| `BERTSERVE_MODEL_DIR` | `models/bbc` |")
    api_key = next(r for r in rows if r.startswith("| `BERTSERVE_API_KEY`"))
    assert "| `unset` |" in api_key


def test_write_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{settings_table.START}\nold table\n{settings_table.END}\nafter\n")
    assert settings_table.main(["--write", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{settings_table.END}\nafter\n")
    assert "old table" not in text
    assert settings_table.current_table(text) == settings_table.settings_table()


def test_write_refuses_a_readme_without_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="settings:start"):
        settings_table.main(["--write", "--readme", str(readme)])
