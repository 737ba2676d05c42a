"""Alert rules: promtool's own checks and unit tests, and a runbook behind every alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool (Debian package prometheus) is not installed")


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


@needs_promtool
def test_rules_are_valid():
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_every_alert_fires_and_stays_silent_in_promtool_unit_tests():
    out = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         timeout=120, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    fired = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    names = {a["alert"] for a in _alerts()}
    assert names <= fired, f"alerts never shown firing: {sorted(names - fired)}"
    assert names <= tested


def test_the_brief_thresholds_are_the_rules():
    by_name = {a["alert"]: a["expr"] for a in _alerts()}
    assert "> 0.05" in by_name["SearchErrorRateHigh"]
    assert "histogram_quantile(0.95" in by_name["SearchLatencyHigh"] and "> 2" in by_name["SearchLatencyHigh"]
    assert "> 0.85" in by_name["MemoryNearLimit"]


@pytest.mark.parametrize("alert", [a["alert"] for a in _alerts()])
def test_every_alert_has_a_runbook_that_names_it(alert):
    rule = next(a for a in _alerts() if a["alert"] == alert)
    page = REPO / rule["annotations"]["runbook_url"]
    assert page.is_file(), f"{alert}: runbook {page} is missing"
    text = page.read_text()
    assert alert in text, f"{page.name} does not mention {alert}"
    for section in ("**Means**", "**Confirm**", "**Do**", "**Roll back**"):
        assert section in text, f"{page.name} has no {section} section"
