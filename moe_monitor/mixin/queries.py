"""Every PromQL query of a generated dashboard, and Grafana's template interpolation, for tests.

`panel_queries(dashboard)` lists the targets of every panel (rows' nested panels included), then the
annotation queries and the template-variable queries, each flagged by `kind`. `substitute(expr, variables)`
expands `$var`, `${var}`, `${var:format}`, `[[var]]` and the built-ins (`$__rate_interval`, `$__interval`,
`$__range`, ...) the way Grafana's Prometheus data source does, so the result can be parsed (promql_parser)
or sent to a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote

PANEL, ANNOTATION, VARIABLE = "panel", "annotation", "variable"


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # dashboard title
    panel: str  # panel title; the annotation's or the variable's name for those kinds
    ref_id: str
    expr: str  # PromQL (for a label_values() variable: its series selector)
    kind: str = PANEL  # PANEL, ANNOTATION or VARIABLE
    instant: bool = False
    legend: str = ""
    repeat: str | None = None  # the template variable a repeated panel iterates over
    label: str | None = None  # for a label_values() variable: the label whose values it lists


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows included, and the panels nested in (collapsed) rows, in dashboard order."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from iter_panels(panel) if panel.get("type") == "row" else ()


def panel_queries(dashboard: dict, kinds: Iterable[str] = (PANEL, ANNOTATION, VARIABLE)) -> list[PanelQuery]:
    kinds = set(kinds)
    title = dashboard.get("title", "")
    out: list[PanelQuery] = []
    if PANEL in kinds:
        for panel in iter_panels(dashboard):
            for target in panel.get("targets") or []:
                if target.get("expr") is None or target.get("hide"):
                    continue
                out.append(PanelQuery(title, panel.get("title", ""), target.get("refId", ""), target["expr"], PANEL,
                                      bool(target.get("instant")) and not target.get("range"),
                                      target.get("legendFormat", ""), panel.get("repeat") or None))
    if ANNOTATION in kinds:
        for a in (dashboard.get("annotations") or {}).get("list") or []:
            if a.get("expr"):
                out.append(PanelQuery(title, a.get("name", ""), "Anno", a["expr"], ANNOTATION,
                                      legend=a.get("titleFormat", "")))
    if VARIABLE in kinds:
        for v in (dashboard.get("templating") or {}).get("list") or []:
            if v.get("type") != "query":
                continue
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            expr, label = variable_expr(q)
            out.append(PanelQuery(title, v.get("name", ""), "Var", expr, VARIABLE, label=label))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<sel>.*\S)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.S)


def variable_expr(query: str) -> tuple[str, str | None]:
    """(PromQL, label) of a Prometheus template-variable query: label_values(selector, label) gives the
    selector; query_result(expr) gives expr; a bare label_values(label) gives '{label!=""}'."""
    m = _LABEL_VALUES.match(query)
    if m:
        label = m.group("label")
        return (m.group("sel") or f'{{{label}!=""}}'), label
    m = _QUERY_RESULT.match(query)
    if m:
        return m.group("expr").strip(), None
    return query.strip(), None


# -- interpolation ----------------------------------------------------------------------------------

# Grafana's variableRegex (public/app/features/variables/utils.ts): $var | [[var(:fmt)]] | ${var(.path)(:fmt)}
_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """'1m30s' -> 90.0 (Prometheus/Grafana duration units ms, s, m, h, d, w, y)."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def builtins(rate_interval: str = "1m", range_: str = "5m", interval: str = "15s") -> dict[str, str]:
    """Grafana's built-in variables as its Prometheus data source sets them ($__range in whole seconds)."""
    range_s = round(duration_seconds(range_))
    return {
        "__interval": interval,
        "__interval_ms": str(round(duration_seconds(interval) * 1000)),
        "__rate_interval": rate_interval,
        "__rate_interval_ms": str(round(duration_seconds(rate_interval) * 1000)),
        "__range": f"{range_s}s",
        "__range_s": str(range_s),
        "__range_ms": str(range_s * 1000),
    }


def prometheus_regular_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to a single-valued variable."""
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def prometheus_regex_escape(value: str) -> str:
    """What it does to each value of a multi-value or include-All variable (a regex inside a PromQL string)."""
    value = value.replace("\\", "\\\\\\\\")
    return re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m.group(0), value)


def _regex_escape(value: str) -> str:  # Grafana's kbn.regexEscape, used by the :regex format
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def _format(name: str, value: str | list[str], fmt: str) -> str:
    values = value if isinstance(value, list) else [value]
    many = isinstance(value, list) and len(value) > 1
    if fmt == "raw":
        return ",".join(values)
    if fmt == "regex":
        escaped = [_regex_escape(v) for v in values]
        return f"({'|'.join(escaped)})" if many else escaped[0] if escaped else ""
    if fmt == "pipe":
        return "|".join(values)
    if fmt == "csv":
        return ",".join(values)
    if fmt == "json":
        return json.dumps(value, separators=(",", ":"))
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in values)
    if fmt == "sqlstring":
        return ",".join("'" + v.replace("'", "''") + "'" for v in values)
    if fmt == "percentencode":
        return quote("{" + ",".join(values) + "}" if many else ",".join(values), safe="-_.!~*'()")
    if fmt == "queryparam":
        return "&".join(f"var-{name}={quote(v, safe='-_.!~*()')}" for v in values)
    if fmt == "text":
        return " + ".join(values)
    # "glob", and Grafana's fallback for an unknown format
    return "{" + ",".join(values) + "}" if many else ",".join(values)


def substitute(expr: str, variables: dict[str, str | list[str]], rate_interval: str = "1m", range_: str = "5m",
               interval: str = "15s", *, multi: Iterable[str] = ()) -> str:
    """Expand template variables in `expr` as Grafana's Prometheus data source does.

    A list value is a multi-value (or include-All) selection: each value regex-escaped, several joined as
    `(a|b)`. A string is a single-valued variable (only `\\` and `'` escaped), unless its name is in `multi`
    (a multi-value variable with one value selected: regex-escaped). `${var:format}` applies Grafana's format
    (raw, regex, pipe, csv, json, glob, singlequote, doublequote, sqlstring, percentencode, queryparam, text).
    Built-ins: $__interval(_ms), $__rate_interval(_ms), $__range, $__range_s, $__range_ms. Unknown variables
    (and `$1` in label_replace) are left as they are, like Grafana does.
    """
    multi = set(multi)
    known = {**builtins(rate_interval, range_, interval), **variables}

    def replace(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        fmt = m.group(3) or m.group(6)
        if name not in known:
            return m.group(0)
        value = known[name]
        if fmt:
            return _format(name, value, fmt)
        if isinstance(value, list):
            escaped = [prometheus_regex_escape(v) for v in value]
            return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"
        return prometheus_regex_escape(value) if name in multi else prometheus_regular_escape(value)

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (needs promql_parser, a test dependency)."""
    import promql_parser

    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal:
                    names.add(m.value)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names
