"""promtool on deploy/: the config, the alert rules, and unit tests of the alerts (tests/deploy/alerts_test.yml:
synthetic series in, which alerts fire and when out). Skipped, with the reason, where promtool is missing."""

from __future__ import annotations

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
