"""The one configuration reader: every variable parsed in one place, bad values named."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from research_pipeline.config import VARIABLES, ConfigError, Settings, gate_variable
from research_pipeline.lib.release.thresholds import GateThresholds

PACKAGE = Path(__file__).resolve().parents[1] / "research_pipeline"

BAD_VALUES = {
    "RP_DATABASE_URL": "mysql://u@h/db",
    "RP_TARGET_DATABASE_URL": "not a url at all",
    "RP_S3_ENDPOINT_URL": "localhost:9000",
    "RP_DEVICE": "tpu",
    "RP_EMBED_PRECISION": "int4",
    "RP_REDIS_URL": "127.0.0.1:6379",
    "RP_KEEP_GENERATIONS": "1",
    "RP_NIGHTLY_CRON": "every night",
    "RP_LOG_FORMAT": "xml",
    "RP_LOG_LEVEL": "LOUD",
    "RP_SEARCH_CONCURRENCY": "0",
    "RP_SEARCH_QUEUE": "-1",
    "RP_SEARCH_TIMEOUT_S": "0",
    "RP_SEARCH_DRAIN_S": "nan",
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_bad_value_fails_naming_the_variable(name):
    with pytest.raises(ConfigError, match=re.escape(name)):
        Settings.from_env({name: BAD_VALUES[name]})


def test_the_search_service_takes_its_scheduling_from_the_configuration():
    from research_pipeline.api.app import ServiceOptions

    settings = Settings.from_env(
        {"RP_SEARCH_CONCURRENCY": "3", "RP_SEARCH_QUEUE": "0", "RP_SEARCH_TIMEOUT_S": "2.5", "RP_SEARCH_DRAIN_S": "0"}
    )
    options = ServiceOptions.from_settings(settings)
    assert (options.concurrency, options.queue, options.timeout_s, options.drain_s) == (3, 0, 2.5, 0.0)
    # A flag given to `serve` wins over the variable.
    assert ServiceOptions.from_settings(settings, concurrency=5).concurrency == 5


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(GateThresholds)])
def test_every_gate_threshold_is_read_from_its_variable(field):
    f = next(f for f in dataclasses.fields(GateThresholds) if f.name == field)
    value = f.default * 2 + 1
    s = Settings.from_env({gate_variable(f): str(value)})
    assert getattr(s.gates, field) == pytest.approx(value)
    with pytest.raises(ConfigError, match=gate_variable(f)):
        Settings.from_env({gate_variable(f): "plenty"})


def test_gate_thresholds_reach_the_dagster_resource():
    from research_pipeline.defs.resources import build_resources

    f = next(f for f in dataclasses.fields(GateThresholds) if f.name == "latency_p95_ms")
    resources = build_resources(Settings.from_env({gate_variable(f): "777"}))
    assert resources["release_gates"].thresholds().latency_p95_ms == 777.0
    assert resources["release_gates"].thresholds() == dataclasses.replace(GateThresholds(), latency_p95_ms=777.0)


def test_set_variables_become_env_vars_in_the_code_location(tmp_path):
    """In the loaded code location a set variable is an EnvVar (the UI shows its source)."""
    code = (
        "from research_pipeline.definitions import defs\n"
        "r = defs.resources['database']\n"
        "print(getattr(r.url, 'env_var_name', 'plain value'))\n"
    )
    env = {"RP_HOME": str(tmp_path), "RP_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["RP_DATABASE_URL"], out.stdout


def test_every_variable_is_documented_in_the_readme_or_docs():
    docs = "".join(p.read_text() for p in [PACKAGE.parent / "README.md", *(PACKAGE.parent / "docs").glob("*.md")])
    missing = [v.name for v in VARIABLES if v.name not in docs]
    assert not missing, f"undocumented settings: {missing}"


def test_only_config_reads_the_environment():
    readers = sorted(
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"os\.environ|getenv", p.read_text())
    )
    assert readers == ["research_pipeline/config.py"], readers


def test_the_retracted_list_reaches_the_ingest(tmp_path):
    from research_pipeline.defs.resources import build_resources

    listing = tmp_path / "retracted.txt"
    listing.write_text("10.1000/retracted\n")
    resources = build_resources(Settings.from_env({"RP_HOME": str(tmp_path), "RP_RETRACTED_FILE": str(listing)}))
    assert resources["inbox"].get_retracted_file() == listing
    assert build_resources(Settings.from_env({"RP_HOME": str(tmp_path)}))["inbox"].get_retracted_file() is None


def test_every_gate_variable_is_documented():
    text = (PACKAGE.parent / "docs" / "RELEASE_GATES.md").read_text()
    missing = [gate_variable(f) for f in dataclasses.fields(GateThresholds) if gate_variable(f) not in text]
    assert not missing, f"docs/RELEASE_GATES.md does not name {missing}"
