"""The provisioned Grafana dashboard: well-formed, on the provisioned datasource, and showing what the issue
asks for. (Its PromQL is evaluated by a real Prometheus in test_deploy_live.py.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from deploy_support import DEPLOY, metric_names

DASHBOARD = DEPLOY / "grafana/dashboards/bertserve.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_panels_are_unique_and_do_not_overlap(dashboard) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_provisioned_datasource(dashboard) -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


def test_template_variables_used_are_defined(dashboard) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = {m for e in exprs(dashboard) for m in re.findall(r"\$(\w+)", e) if not m.startswith("__")}
    assert used <= defined, used - defined


def test_dashboard_shows_what_operators_need(dashboard) -> None:
    """Request rate, p50/p95/p99 from the histograms, queue depth, batch size, padding, rejections by reason,
    provider in use."""
    all_exprs = exprs(dashboard)
    used = set().union(*(metric_names(e) for e in all_exprs))
    required = (
        "bertserve_requests_total",
        "bertserve_request_duration_seconds_bucket",
        "bertserve_queue_depth",
        "bertserve_inflight_requests",
        "bertserve_batch_size_bucket",
        "bertserve_batch_padding_ratio_sum",
        "bertserve_rejected_total",
        "bertserve_model_info",
    )
    for metric in required:
        assert metric in used, f"no panel reads {metric}"
    quantiles = {
        float(q)
        for e in all_exprs
        if "bertserve_request_duration_seconds_bucket" in e
        for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)\s*,", e)
    }  # fmt: skip
    assert {0.5, 0.95, 0.99} <= quantiles, quantiles
    assert any(re.search(r"by \(reason\)", e) and "bertserve_rejected_total" in e for e in all_exprs)
    assert any("provider" in e and "bertserve_model_info" in e for e in all_exprs)
