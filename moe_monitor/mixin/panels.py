"""Panel, query and variable helpers over grafana-foundation-sdk's typed builders (dashboards.py uses them).

Every panel goes through one of these functions, so every panel gets the `${datasource}` data source, a unit,
a description and the same legend and tooltip defaults; every query selector gets the job and instance
matchers through `sel()`. Two small extensions of the SDK (version 10.1 of its schema lacks them): the
Prometheus annotation fields (`step`, `titleFormat`, `textFormat`, `tagKeys`, `useValueForTime`) and the time
series `thresholdsStyle` (a dashed line at an alert threshold).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import bargauge, heatmap, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SCOPE = 'job=~"$job", instance=~"$instance"'  # in every selector of every query

# Units (Grafana unit ids). Ratios of a load to the mean read as "4.2×".
RATIO = "suffix:×"
SHARE = "percentunit"
SECONDS = "s"
COUNT = "short"
PER_SECOND = "short"  # with an axis label naming what is counted (Grafana has no "tokens/s" unit)
BYTES = "bytes"
TIMESTAMP_MS = "dateTimeAsIso"
AGO_MS = "dateTimeFromNow"
ID = "none"  # identifiers (expert ids): plain numbers, no scaling
STATE = "none"  # 0/1 and state series, shown through value mappings


def sel(metric: str, *matchers: str) -> str:
    """`metric{job=~"$job", instance=~"$instance", <matchers>}`."""
    return f"{metric}{{{', '.join((SCOPE, *matchers))}}}"


def query(expr: str, legend: str = "__auto", *, instant: bool = False, fmt: str = "time_series",
          interval: str | None = None) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    q = q.format(pm.PromQueryFormat(fmt))
    if interval:
        q = q.interval(interval)
    return q


def _ref_ids(targets: list[prometheus.Dataquery]) -> list[prometheus.Dataquery]:
    return [t.ref_id(chr(ord("A") + i)) for i, t in enumerate(targets)]


def thresholds(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([dm.Threshold(v, c) for v, c in steps])


GREEN_ONLY = thresholds((None, "green"))


def value_map(mapping: dict[str, tuple[str, str]]) -> list[dm.ValueMap]:
    """{value: (text, color)} as one value-to-text mapping."""
    return [dm.ValueMap({k: dm.ValueMappingResult(text=t, color=c, index=i)
                         for i, (k, (t, c)) in enumerate(mapping.items())})]


def link(title: str, url: str, *, keep: bool = True, blank: bool = False) -> db.DashboardLink:
    """A link that carries the template variables and the time range (to another dashboard) or not."""
    return (db.DashboardLink(title).type(dm.DashboardLinkType.LINK).url(url).include_vars(keep).keep_time(keep)
            .target_blank(blank).as_dropdown(False).icon("dashboard" if keep else "external link").tooltip(title))


def data_link(title: str, url: str) -> dict[str, object]:
    """A field data link (Grafana's `links` field property: title, url, targetBlank)."""
    return {"title": title, "url": url, "targetBlank": True}


class TimeSeries(timeseries.Panel):
    """timeseries.Panel plus `thresholds_style` (the 10.1 schema has the field, its builder lacks the setter)."""

    def thresholds_style(self, mode: str) -> typing.Self:
        self.line_width(1)  # makes sure field_config.defaults.custom exists
        self._internal.field_config.defaults.custom.thresholds_style = common.GraphThresholdsStyleConfig(
            mode=common.GraphTresholdsStyleMode(mode))
        return self


def _common(panel, title: str, description: str, unit: str, targets: list, w: int, h: int, links=()):
    if not description:
        raise ValueError(f"panel {title!r} needs a description")
    panel = (panel.title(title).description(description).unit(unit).datasource(DATASOURCE)
             .targets(_ref_ids(targets)).span(w).height(h))
    if links:
        panel = panel.links(list(links))
    return panel


def _legend(table_legend: bool, calcs: list[str]) -> cb.VizLegendOptions:
    legend = cb.VizLegendOptions().show_legend(True).placement(common.LegendPlacement.BOTTOM)
    if table_legend:
        return legend.display_mode(common.LegendDisplayMode.TABLE).calcs(calcs or ["mean", "max", "lastNotNull"])
    return legend.display_mode(common.LegendDisplayMode.LIST).calcs(calcs)


def ts(title: str, description: str, unit: str, targets: list, *, w: int = 12, h: int = 8,
       axis: str | None = None, stack: bool = False, percent: bool = False, bars: bool = False,
       steps: bool = False, fill: int = 10, min_: float | None = None, max_: float | None = None,
       threshold: float | None = None, table_legend: bool = False, calcs: list[str] | None = None,
       links=(), mappings: list | None = None) -> TimeSeries:
    p = _common(TimeSeries(), title, description, unit, targets, w, h, links)
    p = (p.legend(_legend(table_legend, calcs or []))
         .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
         .line_width(1).fill_opacity(fill).show_points(common.VisibilityMode.NEVER).span_nulls(False)
         .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
         .line_interpolation(common.LineInterpolation.STEP_AFTER if steps else common.LineInterpolation.LINEAR))
    if axis:
        p = p.axis_label(axis)
    if stack or percent:
        mode = common.StackingMode.PERCENT if percent else common.StackingMode.NORMAL
        p = p.stacking(cb.StackingConfig().mode(mode).group("A"))
    if min_ is not None:
        p = p.min(min_)
    if max_ is not None:
        p = p.max(max_)
    if threshold is not None:
        p = p.thresholds(thresholds((None, "green"), (threshold, "red"))).thresholds_style("dashed")
    if mappings:
        p = p.mappings(mappings)
    return p


def stat_panel(title: str, description: str, unit: str, targets: list, *, w: int = 4, h: int = 4,
               steps: tuple = ((None, "green"),), mappings: list | None = None, graph: bool = True,
               decimals: float | None = None, text_mode: str = "auto", calc: str = "lastNotNull",
               links=()) -> stat.Panel:
    p = _common(stat.Panel(), title, description, unit, targets, w, h, links)
    p = (p.thresholds(thresholds(*steps)).color_mode(common.BigValueColorMode.VALUE)
         .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
         .text_mode(common.BigValueTextMode(text_mode)).justify_mode(common.BigValueJustifyMode.AUTO)
         .orientation(common.VizOrientation.AUTO)
         .reduce_options(cb.ReduceDataOptions().calcs([calc]).values(False)))
    if mappings:
        p = p.mappings(mappings)
    if decimals is not None:
        p = p.decimals(decimals)
    return p


def bar_gauge(title: str, description: str, unit: str, targets: list, *, w: int = 12, h: int = 8,
              min_: float | None = 0, max_: float | None = None, steps: tuple = ((None, "blue"),)) -> bargauge.Panel:
    p = _common(bargauge.Panel(), title, description, unit, targets, w, h)
    p = (p.display_mode(common.BarGaugeDisplayMode.GRADIENT).orientation(common.VizOrientation.HORIZONTAL)
         .show_unfilled(True).thresholds(thresholds(*steps))
         .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if min_ is not None:
        p = p.min(min_)
    if max_ is not None:
        p = p.max(max_)
    return p


def state_timeline(title: str, description: str, unit: str, targets: list, *, mappings: list | None = None,
                   w: int = 12, h: int = 6, steps: tuple = ((None, "green"),),
                   color: str = "thresholds") -> statetimeline.Panel:
    p = _common(statetimeline.Panel(), title, description, unit, targets, w, h)
    if mappings:
        p = p.mappings(mappings)
    return (p.thresholds(thresholds(*steps)).color_scheme(db.FieldColor().mode(dm.FieldColorModeId(color)))
            .show_value(common.VisibilityMode.AUTO).merge_values(True).row_height(0.9).fill_opacity(80)
            .line_width(0).align_value(common.TimelineValueAlignment.LEFT)
            .legend(_legend(False, [])).tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE)))


def heatmap_panel(title: str, description: str, unit: str, targets: list, *, y_unit: str, w: int = 12,
                  h: int = 8, scheme: str = "Oranges", y_label: str | None = None, le_buckets: bool = False,
                  links=()) -> heatmap.Panel:
    """A heatmap of pre-bucketed data: Prometheus `le` buckets (`le_buckets`; empty buckets not drawn) or one
    row per series (a zero, e.g. a dead expert, is drawn)."""
    p = _common(heatmap.Panel(), title, description, unit, targets, w, h, links)
    y = heatmap.YAxisConfig().unit(y_unit).axis_placement(common.AxisPlacement.LEFT).reverse(False)
    if y_label:
        y = y.axis_label(y_label)
    rows = heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE if le_buckets
                                               else common.HeatmapCellLayout.AUTO)
    if le_buckets:
        p = p.filter_values(heatmap.FilterValueRange().le(1e-9))
    return (p.calculate(False).rows_frame(rows).y_axis(y)
            .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme(scheme)
                   .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64)
                   .reverse(False))
            .cell_values(heatmap.CellValues().unit(unit)).cell_gap(1).show_value(common.VisibilityMode.NEVER)
            .show_legend().show_tooltip().show_y_histogram().exemplars_color("rgba(255,0,255,0.7)"))


def table_panel(title: str, description: str, unit: str, targets: list, *, w: int = 24, h: int = 8,
                transformations: list[dm.DataTransformerConfig] = (), overrides: list | None = None,
                sort_by: str | None = None) -> table.Panel:
    p = _common(table.Panel(), title, description, unit, targets, w, h)
    p = p.show_header(True).cell_height(common.TableCellHeight.SM).thresholds(GREEN_ONLY)
    for t in transformations:
        p = p.with_transformation(t)
    for name, props in (overrides or []):
        p = p.override_by_name(name, props)
    if sort_by:
        p = p.sort_by([cb.TableSortByFieldState().display_name(sort_by).desc(True)])
    return p


def transform(id_: str, options: dict) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val=id_, options=options)


def prop(id_: str, value: object) -> dm.DynamicConfigValue:
    return dm.DynamicConfigValue(id_val=id_, value=value)


# -- template variables ----------------------------------------------------------------------------

def datasource_variable() -> db.DatasourceVariable:
    # id = name: Grafana (before scenes) keys its variable state by id; the SDK's default id is one zero UUID
    # for every variable, which would make them overwrite each other.
    return (db.DatasourceVariable("datasource").id("datasource").label("Data source").type("prometheus")
            .description("Prometheus that scrapes the moe-monitor sidecars"))


def query_variable(name: str, label: str, query_: str, description: str, *, multi: bool = True,
                   include_all: bool = True, sort=dm.VariableSort.ALPHABETICAL_ASC) -> db.QueryVariable:
    v = (db.QueryVariable(name).id(name).label(label).description(description).datasource(DATASOURCE)
         .query(query_).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(sort).multi(multi)
         .include_all(include_all))
    return v


# -- annotations -----------------------------------------------------------------------------------

class PrometheusAnnotationQuery(dm.AnnotationQuery):
    """dm.AnnotationQuery with the Prometheus data source's own annotation fields."""

    def __init__(self) -> None:
        super().__init__()
        self.step: str | None = None
        self.title_format: str | None = None
        self.text_format: str | None = None
        self.tag_keys: str | None = None
        self.use_value_for_time = False

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        for key, value in (("step", self.step), ("titleFormat", self.title_format),
                           ("textFormat", self.text_format), ("tagKeys", self.tag_keys)):
            if value is not None:
                payload[key] = value
        if self.use_value_for_time:
            payload["useValueForTime"] = True
        return payload


class PrometheusAnnotation(db.AnnotationQuery):
    def __init__(self) -> None:
        super().__init__()
        self._internal = PrometheusAnnotationQuery()

    def step(self, step: str) -> typing.Self:
        self._internal.step = step
        return self

    def title_format(self, fmt: str) -> typing.Self:
        self._internal.title_format = fmt
        return self

    def text_format(self, fmt: str) -> typing.Self:
        self._internal.text_format = fmt
        return self

    def tag_keys(self, keys: str) -> typing.Self:
        self._internal.tag_keys = keys
        return self

    def use_value_for_time(self) -> typing.Self:
        self._internal.use_value_for_time = True
        return self


def annotation(name: str, expr: str, color: str, *, title: str, text: str = "", tags: str = "",
               step: str = "60s", value_is_time: bool = False, enable: bool = True) -> PrometheusAnnotation:
    a = (PrometheusAnnotation().name(name).datasource(DATASOURCE).enable(enable).hide(False).icon_color(color)
         .expr(expr).step(step).title_format(title).text_format(text).tag_keys(tags))
    return a.use_value_for_time() if value_is_time else a


@dataclass
class Row:
    """A dashboard row and its panels; collapsed rows hold their panels (loaded when opened)."""

    title: str
    panels: list[cogbuilder.Builder] = field(default_factory=list)
    collapsed: bool = False
    repeat: str | None = None


def assemble(dashboard: db.Dashboard, rows: list[Row]) -> db.Dashboard:
    """Add rows and panels in order with unique panel ids (1, 2, ...); the SDK lays them out on the grid."""
    next_id = iter(range(1, 10_000))
    for r in rows:
        row = db.Row(r.title).id(next(next_id))
        if r.repeat:
            row = row.repeat(r.repeat)
        if r.collapsed:
            for p in r.panels:
                row = row.with_panel(p.id(next(next_id)))
            dashboard = dashboard.with_row(row)
        else:
            dashboard = dashboard.with_row(row.collapsed(False))
            for p in r.panels:
                dashboard = dashboard.with_panel(p.id(next(next_id)))
    return dashboard
