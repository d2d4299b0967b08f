"""promtool on deploy/: the config, the alert rules, and unit tests of the alerts (tests/deploy/alerts_test.yml:
synthetic series in, which alerts fire and when out). Skipped, with the reason, where promtool is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from deploy_support import DEPLOY

HERE = Path(__file__).resolve().parent
RULE_FILES = sorted((DEPLOY / "rules").glob("*.yml"))


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_config(promtool: str) -> None:
    proc = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The rule_files glob must find the rules: "SUCCESS: N rule files found" with N > 0.
    assert f"{len(RULE_FILES)} rule files found" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_promtool_check_rules(promtool: str) -> None:
    assert RULE_FILES
    proc = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """Control: a PromQL syntax error in a copy of the rules fails the same check."""
    broken = tmp_path / "rules.yml"
    text = RULE_FILES[0].read_text(encoding="utf-8")
    broken.write_text(text.replace("histogram_quantile(0.99,", "histogram_quantile(0.99,,", 1), encoding="utf-8")
    proc = run([promtool, "check", "rules", str(broken)])
    assert proc.returncode != 0, proc.stdout


def test_alert_rules_fire_when_and_only_when_they_should(promtool: str, tmp_path: Path) -> None:
    # promtool resolves rule_files relative to the test file: keep the repository layout in the copy.
    work = tmp_path / "repo"
    shutil.copytree(DEPLOY / "rules", work / "deploy" / "rules")
    (work / "tests" / "deploy").mkdir(parents=True)
    shutil.copy(HERE / "alerts_test.yml", work / "tests" / "deploy" / "alerts_test.yml")
    proc = run([promtool, "test", "rules", str(work / "tests" / "deploy" / "alerts_test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_unit_tests_fail_against_a_wrong_threshold(promtool: str, tmp_path: Path) -> None:
    """Control: with the p99 threshold raised to 2 s the latency case must fail."""
    work = tmp_path / "repo"
    shutil.copytree(DEPLOY / "rules", work / "deploy" / "rules")
    rules = work / "deploy" / "rules" / "bertserve.yml"
    text = rules.read_text(encoding="utf-8")
    assert ") > 0.5" in text
    rules.write_text(text.replace(") > 0.5", ") > 2", 1), encoding="utf-8")
    (work / "tests" / "deploy").mkdir(parents=True)
    shutil.copy(HERE / "alerts_test.yml", work / "tests" / "deploy" / "alerts_test.yml")
    proc = run([promtool, "test", "rules", str(work / "tests" / "deploy" / "alerts_test.yml")])
    assert proc.returncode != 0 and "BertserveHighP99Latency" in proc.stdout + proc.stderr


def _drift_rules() -> dict[str, dict[str, object]]:
    import yaml

    groups = yaml.safe_load((DEPLOY / "rules" / "bertserve.yml").read_text(encoding="utf-8"))["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "drift" in r.get("alert", "").lower()}


def test_drift_alerts_fire_on_psi_above_0_2_for_15_minutes() -> None:
    rules = _drift_rules()
    assert set(rules) == {"BertserveLabelDrift", "BertserveConfidenceDrift"}
    for name, metric in (
        ("BertserveLabelDrift", "bertserve_label_drift_psi"),
        ("BertserveConfidenceDrift", "bertserve_confidence_drift_psi"),
    ):
        rule = rules[name]
        assert metric in str(rule["expr"]) and str(rule["expr"]).strip().endswith("> 0.2"), rule["expr"]
        assert rule["for"] == "15m"


def test_drift_alerts_read_series_the_monitor_exports() -> None:
    """The names in the rules are the names service.monitoring really exposes (with a reference, after traffic)."""
    from types import SimpleNamespace

    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from service.monitoring import PredictionMonitor

    registry = CollectorRegistry()
    reference = SimpleNamespace(
        n=10, labels={"a": 0.5, "b": 0.5}, confidence_edges=[0.0, 0.5, 1.0], confidence=[0.5, 0.5]
    )
    monitor = PredictionMonitor(registry, "bbc", ["a", "b"], reference, window=10)
    monitor.observe(np.array([[0.9, 0.1]] * 10, dtype=np.float32), [[0]] * 10)
    text = generate_latest(registry).decode()
    for rule in _drift_rules().values():
        metric = re.search(r"bertserve_\w+", str(rule["expr"]))
        assert metric is not None and f'{metric.group(0)}{{model="bbc"}}' in text, (metric, text)


def test_drift_unit_tests_fail_against_a_wrong_threshold(promtool: str, tmp_path: Path) -> None:
    """Control: with the label PSI threshold raised to 0.5 the drift case must fail."""
    work = tmp_path / "repo"
    shutil.copytree(DEPLOY / "rules", work / "deploy" / "rules")
    rules = work / "deploy" / "rules" / "bertserve.yml"
    text = rules.read_text(encoding="utf-8")
    assert "(bertserve_label_drift_psi) > 0.2" in text
    rules.write_text(
        text.replace("(bertserve_label_drift_psi) > 0.2", "(bertserve_label_drift_psi) > 0.5"), encoding="utf-8"
    )
    (work / "tests" / "deploy").mkdir(parents=True)
    shutil.copy(HERE / "alerts_test.yml", work / "tests" / "deploy" / "alerts_test.yml")
    proc = run([promtool, "test", "rules", str(work / "tests" / "deploy" / "alerts_test.yml")])
    assert proc.returncode != 0 and "BertserveLabelDrift" in proc.stdout + proc.stderr
