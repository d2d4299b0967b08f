"""The provisioned Grafana dashboard: well-formed, on the provisioned datasource, and showing what the issue
asks for. (Its PromQL is evaluated by a real Prometheus in test_deploy_live.py.)"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
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
    }
    assert {0.5, 0.95, 0.99} <= quantiles, quantiles
    assert any(re.search(r"by \(reason\)", e) and "bertserve_rejected_total" in e for e in all_exprs)
    assert any("provider" in e and "bertserve_model_info" in e for e in all_exprs)


def test_dashboard_shows_predictions_and_drift(dashboard) -> None:
    """Predictions per label (rate), confidence p50/p10, the low-margin share, and both PSIs with the alert's 0.2
    drawn as a threshold."""
    panels = {p["title"]: p for p in dashboard["panels"]}
    all_exprs = exprs(dashboard)
    assert any("rate(bertserve_predictions_total" in e and "by (model, label)" in e for e in all_exprs)
    confidence = {
        float(q)
        for e in all_exprs
        if "bertserve_prediction_confidence_bucket" in e
        for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)\s*,", e)
    }
    assert {0.5, 0.1} <= confidence, confidence
    assert any(
        "bertserve_low_margin_predictions_total" in e and "bertserve_prediction_confidence_count" in e
        for e in all_exprs
    )
    for metric in ("bertserve_label_drift_psi", "bertserve_confidence_drift_psi"):
        (panel,) = [p for p in panels.values() if any(metric in t["expr"] for t in p["targets"])]
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert any(s["value"] == 0.2 and s["color"] == "red" for s in steps), panel["title"]
        assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"


def test_prediction_panels_read_series_the_monitor_exports(dashboard) -> None:
    """Every bertserve_ name a prediction/drift panel reads is in a real PredictionMonitor's exposition."""
    from types import SimpleNamespace

    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from service.monitoring import PredictionMonitor

    registry = CollectorRegistry()
    reference = SimpleNamespace(
        n=10, labels={"a": 0.5, "b": 0.5}, confidence_edges=[0.0, 0.5, 1.0], confidence=[0.5, 0.5]
    )
    monitor = PredictionMonitor(registry, "bbc", ["a", "b"], reference, window=10)
    monitor.observe(np.array([[0.55, 0.45]] * 10, dtype=np.float32), [[0]] * 10)
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    monitoring_names = {"predictions", "prediction_confidence", "low_margin", "drift_psi"}
    read = {n for e in exprs(dashboard) for n in metric_names(e) if any(k in n for k in monitoring_names)}
    assert len(read) >= 5, read
    assert read <= exposed, read - exposed


# Grafana's provisioning file formats (apiVersion 1), from its "Provision Grafana" reference: the fields of a
# datasource and of a dashboard provider, closed, so a misspelt key fails here instead of being ignored by Grafana
# (which cannot be pulled here to load them).
_DATASOURCE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "type"],
    "properties": {
        "name": {"type": "string"},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "type": {"type": "string"},
        "access": {"enum": ["proxy", "direct"]},
        "orgId": {"type": "integer"},
        "url": {"type": "string", "pattern": "^https?://"},
        "user": {"type": "string"},
        "database": {"type": "string"},
        "basicAuth": {"type": "boolean"},
        "basicAuthUser": {"type": "string"},
        "withCredentials": {"type": "boolean"},
        "isDefault": {"type": "boolean"},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "jsonData": {"type": "object"},
        "secureJsonData": {"type": "object"},
    },
}
_PROVIDER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "type", "options"],
    "properties": {
        "name": {"type": "string"},
        "orgId": {"type": "integer"},
        "folder": {"type": "string"},
        "folderUid": {"type": "string"},
        "type": {"const": "file"},
        "disableDeletion": {"type": "boolean"},
        "updateIntervalSeconds": {"type": "integer", "minimum": 1},
        "allowUiUpdates": {"type": "boolean"},
        "options": {
            "type": "object",
            "additionalProperties": False,
            "required": ["path"],
            "properties": {"path": {"type": "string"}, "foldersFromFilesStructure": {"type": "boolean"}},
        },
    },
}
PROVISIONING_SCHEMAS = {
    "datasources": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "datasources"],
        "properties": {
            "apiVersion": {"const": 1},
            "datasources": {"type": "array", "minItems": 1, "items": _DATASOURCE},
            "deleteDatasources": {"type": "array"},
            "prune": {"type": "boolean"},
        },
    },
    "dashboards": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "providers"],
        "properties": {"apiVersion": {"const": 1}, "providers": {"type": "array", "minItems": 1, "items": _PROVIDER}},
    },
}


@pytest.mark.parametrize("kind", sorted(PROVISIONING_SCHEMAS))
def test_provisioning_files_follow_grafanas_format(kind: str) -> None:
    files = sorted((DEPLOY / "grafana/provisioning" / kind).glob("*.yml"))
    assert files
    for path in files:
        jsonschema.validate(yaml.safe_load(path.read_text(encoding="utf-8")), PROVISIONING_SCHEMAS[kind])
    broken = yaml.safe_load(files[0].read_text(encoding="utf-8"))
    entries = broken["datasources" if kind == "datasources" else "providers"]
    entries[0]["isDefualt" if kind == "datasources" else "disableDeletions"] = True  # a control: a typo fails
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, PROVISIONING_SCHEMAS[kind])
