"""The docs' measured numbers are the benchmark summaries': every generated table matches its summary, every block
names a known table, every tracked summary feeds a doc, and a changed number shows up as a stale doc."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import tables

ROOT = Path(__file__).resolve().parents[2]


def test_every_doc_matches_the_summaries() -> None:
    stale = [str(doc.relative_to(ROOT)) for doc in tables.stale()]
    assert not stale, f"{stale}: bench tables differ from bench/results/; run `python -m bench.tables --write`"


def test_blocks_name_known_tables_and_every_tracked_summary_is_used() -> None:
    used = {name for doc in tables.DOCS for name in re.findall(r"<!-- bench:([a-z-]+):start -->", doc.read_text())}
    assert used <= set(tables.RENDER), used - set(tables.RENDER)
    tracked = subprocess.run(["git", "ls-files", "bench/results/*.json"], cwd=ROOT, capture_output=True, text=True)
    files = {Path(line).name for line in tracked.stdout.split()}
    assert files == {tables.RENDER[name][0] for name in used} == {"demo.json", "frontend.json", "isolation.json"}
    for file in files:
        assert (ROOT / "bench" / "results" / file).stat().st_size < 20_000, f"{file} is not a small summary"


def test_a_changed_number_makes_the_doc_stale(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results)
    demo = json.loads((results / "demo.json").read_text())
    point = next(p for p in demo["variants"]["fp32"]["points"] if p["server"] == "bertserve")
    point["inputs_per_s"] += 1000.0
    (results / "demo.json").write_text(json.dumps(demo))
    readme = ROOT / "README.md"
    assert tables.stale([readme], results) == [readme]
    assert f"{point['inputs_per_s']:,.1f}" in tables.regenerate(readme.read_text(), results)
    with pytest.raises(KeyError, match="unknown bench block"):
        tables.regenerate("<!-- bench:nope:start -->\n<!-- bench:nope:end -->", results)


def test_demo_table_without_a_ceiling_or_batch_1_and_with_a_baseline() -> None:
    demo = json.loads((ROOT / "bench" / "results" / "demo.json").read_text())
    block = demo["variants"]["fp32"]
    block["ceiling"]["batch1"] = None
    for p in block["points"]:
        p["vs_baseline"] = 1.25
    text = tables.demo_table(demo)
    assert "batch 1" not in text and "/ baseline" in text and "| 1.250 |" in text
    block["ceiling"] = None
    assert "ceiling (" not in tables.demo_table(demo)
