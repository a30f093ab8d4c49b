"""Ops assets: the alert rules pass promtool, the dashboard imports, and both use only exposed metrics.

The metric names in gateway/metrics.py are the contract between the gateway and ops/: a renamed metric
must fail here, not leave a dashboard panel silently empty or an alert that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from gateway.metrics import Metrics
from gateway.model import DeliveryState

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "ops" / "grafana" / "dicom-gateway.json"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "ops" / "prometheus" / "alerts_test.yml"
SCRAPE_EXAMPLE = REPO / "ops" / "prometheus" / "scrape-example.yml"

METRIC_NAME = re.compile(r"\bdicom_gateway_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Grafana's variables, replaced by values Prometheus can parse (what "All" and a 1-minute scrape give).
GRAFANA_VARIABLES = {"node": ".+", "destination": ".*", "job": "dicom-gateway", "__rate_interval": "2m"}

# Metrics the gateway exposes that neither the dashboard nor the rules use, each with the reason.
# Empty today: a new metric goes onto the dashboard (or an alert), or here with a reason.
UNUSED_ALLOWED: dict[str, str] = {}

ALERTS_REQUIRED = {
    "GatewayDown",
    "DestinationDown",
    "BacklogTooOld",
    "SpoolNearReserve",
    "DeliveriesFailed",
    "StoreFailures",
    "UpsOnBattery",
    "PowerHold",
    "MqttDisconnected",
}


# ---------------------------------------------------------------- helpers


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail (never skip) when it is missing."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: run make test, which installs Debian's prometheus package")
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, check=False, timeout=60, cwd=REPO
    )


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}\n{result.stdout}\n{result.stderr}"


@cache
def exposition() -> str:
    """The gateway's /metrics text, with every labelled metric touched once so that it has a sample."""
    m = Metrics(allowed_calling_ae=["CT1"], version="test")
    m.associations_accepted.labels(calling_ae="CT1").inc(0)
    m.associations_rejected.labels(reason="calling_ae").inc(0)
    m.instances_received.labels(calling_ae="CT1").inc(0)
    m.bytes_received.labels(calling_ae="CT1").inc(0)
    m.store_failures.labels(reason="reserve").inc(0)
    m.instances_forwarded.labels(destination="pacs").inc(0)
    m.bytes_forwarded.labels(destination="pacs").inc(0)
    m.forward_failures.labels(destination="pacs", kind="transient").inc(0)
    for state in DeliveryState:
        m.queue_depth.labels(destination="pacs", state=state.value).set(0)
    m.oldest_pending_age.labels(destination="pacs").set(0)
    m.destination_up.labels(destination="pacs").set(1)
    m.forward_latency.labels(destination="pacs").observe(1.5)
    m.device_up.labels(device="ups").set(1)
    m.device_value.labels(device="ups", quantity="battery_voltage").set(27.1)
    m.ups_on_battery.labels(device="ups").set(0)
    m.ups_battery_low.labels(device="ups").set(0)
    m.spool_reserve_bytes.set(2 << 30)
    m.spool_free_bytes.set(10 << 30)
    return generate_latest(m.registry).decode()


def metric_types() -> dict[str, str]:
    """Family name -> type, from the exposition's `# TYPE` lines."""
    found = re.findall(r"^# TYPE (\S+) (\S+)$", exposition(), flags=re.MULTILINE)
    return dict(found)


def sample_names() -> set[str]:
    """Every sample name in the exposition (`..._total`, `..._bucket`, `dicom_gateway_build_info`, ...)."""
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition(), flags=re.MULTILINE))


def family(name: str, types: dict[str, str]) -> str:
    """The metric a sample name belongs to: histograms lose `_bucket`, `_count` and `_sum`."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return base
    return name


def exposed_metrics() -> set[str]:
    """The gateway's metrics, less the `_created` gauges prometheus_client adds to counters and histograms."""
    types = metric_types()

    def is_created_companion(name: str) -> bool:
        base = name.removesuffix("_created")
        return base != name and (types.get(f"{base}_total") == "counter" or types.get(base) == "histogram")

    return {name for name in types if name.startswith("dicom_gateway_") and not is_created_companion(name)}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Top-level panels and those inside collapsed rows."""
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def data_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(board) if p["type"] != "row"]


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL text of the dashboard: panel targets, variable queries, annotation queries."""
    queries = [t["expr"] for p in data_panels(board) for t in p["targets"]]
    queries += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    queries += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    return queries


def substitute_variables(expr: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def rules_text() -> str:
    """alerts.yml without its comment lines (metric names in annotations count as used)."""
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def used_metric_names() -> dict[str, set[str]]:
    return {
        "dashboard": set(METRIC_NAME.findall("\n".join(dashboard_queries(dashboard())))),
        "alerts.yml": set(METRIC_NAME.findall(rules_text())),
    }


# ---------------------------------------------------------------- alert rules


def test_alert_rules_pass_promtool_check() -> None:
    assert_ok(promtool("check", "rules", ALERTS))


def test_alert_rules_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", ALERTS_TEST))


def test_every_required_alert_is_defined() -> None:
    defined = set(re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(encoding="utf-8"), re.MULTILINE))
    assert defined >= ALERTS_REQUIRED, f"missing alerts: {sorted(ALERTS_REQUIRED - defined)}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    defined = set(re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(encoding="utf-8"), re.MULTILINE))
    cases = re.findall(
        r"alertname: (\w+)\s*\n\s*exp_alerts:[ \t]*(\[\])?", ALERTS_TEST.read_text(encoding="utf-8")
    )
    firing = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    assert defined - firing == set(), "alerts never tested firing"
    assert defined - quiet == set(), "alerts never tested not firing"


def test_scrape_example_is_a_valid_prometheus_config() -> None:
    # It loads alerts.yml too, so the example and the rules cannot drift apart.
    assert_ok(promtool("check", "config", SCRAPE_EXAMPLE))


# ---------------------------------------------------------------- dashboard


def test_dashboard_is_an_importable_fleet_dashboard() -> None:
    board = dashboard()
    assert board["title"] == "DICOM gateway fleet"
    assert board["uid"]
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    node = variables["node"]
    assert node["query"] == "label_values(dicom_gateway_build_info, instance)"
    assert node["multi"] is True
    assert node["includeAll"] is True


def test_every_panel_has_a_place_and_queries() -> None:
    panels = all_panels(dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert "legendFormat" in target, panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_panel_follows_the_node_selector_and_rate_interval() -> None:
    for panel in data_panels(dashboard()):
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$node"' in expr, f"{panel['title']}: not filtered by $node"
            windows = set(re.findall(r"\[([^\]]+)\]", expr))
            assert windows <= {"$__rate_interval"}, f"{panel['title']}: fixed range {windows}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses rule expressions: wrap each query in a recording rule (JSON is YAML).
    rules = [
        {"record": f"dashboard:query_{n}", "expr": substitute_variables(query)}
        for n, query in enumerate(dashboard_queries(dashboard()))
        if not query.startswith("label_values(")
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    assert_ok(promtool("check", "rules", path))


def test_dashboard_queries_find_data_in_the_gateways_exposition(tmp_path: Path) -> None:
    # Feed promtool one scrape of a gateway as constant series, and expect every panel query to answer:
    # this catches label names and values (state="failed", destination) that match nothing.
    series = [{"series": 'up{job="dicom-gateway", instance="ct-room-1"}', "values": "1x10"}]
    for name, labels, value in re.findall(r"^(\w+)(?:\{(.*)\})? (\S+)$", exposition(), re.MULTILINE):
        if not name.endswith("_created"):
            selector = ", ".join(filter(None, ['job="dicom-gateway", instance="ct-room-1"', labels]))
            series.append({"series": f"{name}{{{selector}}}", "values": f"{value}x10"})
    cases = [
        {
            "expr": f"(count({substitute_variables(query)}) > bool 0) or vector(0)",
            "eval_time": "5m",
            "exp_samples": [{"labels": "{}", "value": 1}],
        }
        for query in dashboard_queries(dashboard())
        if not query.startswith(("label_values(", "ALERTS"))
    ]
    tests = {"tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}
    path = tmp_path / "dashboard_test.yml"
    path.write_text(json.dumps(tests), encoding="utf-8")
    assert_ok(promtool("test", "rules", path))


# ---------------------------------------------------------------- the metric contract


@pytest.mark.parametrize("source", ["dashboard", "alerts.yml"])
def test_every_metric_used_is_exposed_by_the_gateway(source: str) -> None:
    used = used_metric_names()[source]
    assert used, f"no metric names found in {source}"
    missing = used - sample_names()
    assert missing == set(), f"{source} uses metrics the gateway does not expose"


def test_every_exposed_metric_is_on_the_dashboard_or_in_the_rules() -> None:
    types = metric_types()
    used = {family(name, types) for names in used_metric_names().values() for name in names}
    unused = exposed_metrics() - used
    assert unused == set(UNUSED_ALLOWED), (
        "add new metrics to ops/grafana/dicom-gateway.json (or an alert), or to UNUSED_ALLOWED with a reason"
    )
