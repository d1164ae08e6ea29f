"""deploy/grafana-dashboard.json against a live ``/v1/metrics``: every metric a query
names is exported (a renamed metric would leave a panel silently empty), and every
``websocketserver_*`` metric exported is charted."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from support import ROOT, StartServer

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
            "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}
"""The names of a family's series, by its type (the text format's conventions)."""
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_LABEL_VALUES = re.compile(r"label_values\((?:(.+),)?\s*\w+\s*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: its identifiers less functions
    (followed by a parenthesis), label matchers, ranges, grouping clauses and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ",
                  text)
    names = re.findall(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return set(names) - _KEYWORDS


def queries(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: the panels' ``expr`` and the series
    selectors of its variables' ``label_values(...)``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                found = _LABEL_VALUES.fullmatch(value.strip())
                if found and found.group(1):
                    yield found.group(1)
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The dashboard's panels, those in rows included; rows left out."""
    for panel in node.get("panels", ()):
        if panel["type"] == "row":
            yield from panels(panel)
        else:
            yield panel


def test_metric_names_are_read_from_promql() -> None:
    """The reading the dashboard test relies on: names, not functions, labels, keywords."""
    expr = ('histogram_quantile(0.95, sum by (le, service) (rate(a_seconds_bucket{port="ws",'
            ' x=~"$instance"}[$__rate_interval]))) / on (instance) group_left b_total '
            'unless c:recorded offset 5m > bool 1e3')
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:recorded"}


def test_every_dashboard_query_names_an_exported_metric(start_server: StartServer) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in panels(dashboard):
        assert [target["expr"] for target in panel["targets"]], panel["title"]
    wanted = {name for expr in queries(dashboard) for name in metric_names(expr)}
    assert "websocketserver_tunnels_open" in wanted  # the variable's, at least

    server = start_server()
    status, _, body = server.get("/v1/metrics")
    assert status == 200
    series: dict[str, set[str]] = {}  # family -> the names of its series
    for family in text_string_to_metric_families(body.decode()):
        series[family.name] = {family.name + suffix for suffix in SUFFIXES[family.type]}
        series[family.name].update(sample.name for sample in family.samples)
    exported = set().union(*series.values())
    assert sorted(wanted - exported) == [], "the dashboard charts metrics nobody exports"
    uncharted = [family for family, names in series.items()  # not a counter's start time:
                 if family.startswith("websocketserver_") and not family.endswith("_created")
                 and not names & wanted]
    assert uncharted == [], "exported but not charted in deploy/grafana-dashboard.json"
