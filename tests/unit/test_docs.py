"""The README is the code's own account: its settings table is generated, every metric is listed, the two commands
come first, and it stays a front door (under 15 KB, details linked, not pasted)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import settings_table  # noqa: E402  (scripts/ is not a package)

from service.metrics import Metrics  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_settings_table_is_generated_from_settings() -> None:
    assert settings_table.current_table(README) == settings_table.settings_table(), (
        f"README.md's settings table differs from service.config.Settings: run `{settings_table.WRITE_COMMAND}`"
    )


def test_every_metric_is_documented() -> None:
    names = {metric.name for metric in Metrics().registry.collect()}
    assert names
    for name in names:
        assert f"`{name}" in README, f"metric {name} missing from README"


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join(README.splitlines()[:8])
    assert "make run" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_is_a_front_door() -> None:
    size = len(README.encode("utf-8"))
    assert size < 15_000, f"README.md is {size} bytes: move details to docs/ and link them (limit 15,000)"


def test_relative_links_resolve() -> None:
    """Every relative link in the README and in docs/*.md points at a file or directory that exists."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_docs_and_bench_name_no_issues_and_no_scratch_paths() -> None:
    """Docs describe the present: no issue numbers, no scratch or machine-local paths (in the docs, the benchmark
    notes, and the benchmarks' code and comments)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").rglob("*.md"))]
    files += [*sorted((ROOT / "bench").rglob("*.py")), *sorted((ROOT / "bench").rglob("*.lua"))]
    pattern = re.compile(r"\bissues? #?\d+|#\d{2,}\b|/tmp/|/work/|\.\./shared/", re.IGNORECASE)
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)
