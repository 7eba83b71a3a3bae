"""Recording and alerting rules, as Prometheus rule-group dicts built from a `MixinConfig`.

Conventions (docs/alerts.md has the why of each alert):
- Every selector carries `cfg.selector`; recording rules keep `job`, `instance` and their own labels; alerts
  aggregate only over the sidecar's own labels (`without (layer)`), so target labels such as `namespace` and
  `pod` reach Alertmanager. Deployment-wide rules sum over a deployment's sidecars `by (deployment_by(cfg))`:
  `job`, `cfg.deployment_scope_labels` (`namespace`) and the deployment label, which the alert then carries.
- Routing alerts read the per-window gauges, NaN for windows with too few assignments. They keep only
  *loaded* windows (`cfg.min_expert_load` mean assignments per expert) and take the minimum over the last
  `cfg.rate_window` of them: "above the threshold in every loaded window", where an idle or NaN window
  neither fires nor resets the `for`; a fully idle stretch yields no sample, so nothing fires.
"""

from __future__ import annotations

import re

from .config import MixinConfig

# Recording rule names: dashboards (moe_monitor/mixin/queries.py) query these. Stable whatever the window.
STEP_DURATION_P50 = "moe:step_duration_seconds:p50_rate5m"
STEP_DURATION_P99 = "moe:step_duration_seconds:p99_rate5m"
STEP_TOKENS_RATE = "moe:step_tokens:rate5m"
EP_RANK_ROUTED_RATE = "moe:ep_rank_routed_tokens:rate5m"
LAYER_EP_RANK_IMBALANCE = "moe:layer_ep_rank_imbalance_ratio:rate5m"
ROUTED_ASSIGNMENTS_RATE = "moe:routed_assignments:rate5m"
WORST_LAYER_IMBALANCE_MAX = "moe:worst_layer_imbalance_ratio:max_over_time5m"
# Deployment-wide: one model's ranks spread over several sidecars (one per node), summed over the sidecars that
# share the deployment label (cfg.deployment_label). Each sidecar's per-EP-rank (per-expert) counters are the load
# its own ranks' tokens put on every EP rank (expert), so the deployment's load is their sum.
DEPLOYMENT_EP_RANK_ROUTED_RATE = "moe:deployment_ep_rank_routed_tokens:rate5m"
DEPLOYMENT_LAYER_EP_RANK_IMBALANCE = "moe:deployment_layer_ep_rank_imbalance_ratio:rate5m"
DEPLOYMENT_EXPERT_ROUTED_RATE = "moe:deployment_expert_routed_tokens:rate5m"
DEPLOYMENT_LAYER_EXPERT_IMBALANCE = "moe:deployment_layer_expert_imbalance_ratio:rate5m"
# The deployment's share of expert time lost to EP-rank imbalance, every layer: what moe_ep_expert_time_lost_ratio
# is for one sidecar (docs/metrics.md, "What imbalance costs"), from the summed loads.
DEPLOYMENT_EP_EXPERT_TIME_LOST = "moe:deployment_ep_expert_time_lost_ratio:rate5m"

# Rules of one group run one after the other at the same evaluation time; groups run concurrently (Prometheus) or in
# an unspecified order (promtool), each at its own offset. A rule that reads a recording rule therefore sits in the
# same group, after it (check_rule_order): read across groups it would see the recording one evaluation late, or
# not, by chance (an alert with `for:` would then fire one evaluation later or not, depending on the group order).
RECORDING_GROUP = "moe-monitor.rules"
DEPLOYMENT_GROUP = "moe-monitor.deployment"
ALERTING_GROUP = "moe-monitor.alerts"

# Go-template pieces of the annotations.
VALUE = "{{ $value | humanize }}"
INSTANCE = "{{ $labels.instance }}"
LAYER = "{{ $labels.layer }}"


def sel(cfg: MixinConfig, metric: str, *matchers: str) -> str:
    """`metric{<cfg.selector>, <matchers>}`."""
    parts = [m for m in (cfg.selector.strip().rstrip(","), *matchers) if m]
    return f"{metric}{{{', '.join(parts)}}}" if parts else metric


def labelled(cfg: MixinConfig) -> str:
    """The matcher that keeps only targets carrying the deployment label."""
    return f'{cfg.deployment_label}!=""'


def deployment_by(cfg: MixinConfig) -> str:
    """The labels a deployment-wide figure is aggregated by: job, cfg.deployment_scope_labels (namespace: an alert
    without it is not routed by prometheus-operator's AlertmanagerConfig) and the deployment label."""
    return ", ".join(("job", *cfg.deployment_scope_labels, cfg.deployment_label))


def recording_rules(cfg: MixinConfig) -> dict:
    w = cfg.rate_window

    def quantile(q: float) -> str:
        return (f"histogram_quantile({q},\n  sum by (job, instance, phase, tokens_le, le) (\n"
                f"    rate({sel(cfg, 'moe_step_duration_seconds_bucket')}[{w}])\n  )\n)")

    # All layers' assignments per second: the EP-rank counters (T1, exact), or where T1 is off the mean of
    # the per-window gauge over the scraped windows divided by the window length (T0, an estimate).
    assignments = (
        f"sum by (job, instance) (rate({sel(cfg, 'moe_ep_rank_routed_tokens_total')}[{w}]))\n"
        f"or\nsum by (job, instance) (\n"
        f"  avg_over_time({sel(cfg, 'moe_window_routed_tokens')}[{w}])\n"
        f"  / {sel(cfg, 'moe_window_length_seconds')}\n)")
    rules = [
        (STEP_DURATION_P50, quantile(0.5)),
        (STEP_DURATION_P99, quantile(0.99)),
        (STEP_TOKENS_RATE, f"sum by (job, instance, phase) (rate({sel(cfg, 'moe_step_tokens_total')}[{w}]))"),
        (EP_RANK_ROUTED_RATE,
         f"sum by (job, instance, layer, ep_rank) (rate({sel(cfg, 'moe_ep_rank_routed_tokens_total')}[{w}]))"),
        # NaN when the layer routed nothing (0 / 0): comparisons with it are false.
        (LAYER_EP_RANK_IMBALANCE,
         f"max by (job, instance, layer) ({EP_RANK_ROUTED_RATE})\n"
         f"/\navg by (job, instance, layer) ({EP_RANK_ROUTED_RATE})"),
        (ROUTED_ASSIGNMENTS_RATE, assignments),
        (WORST_LAYER_IMBALANCE_MAX,
         f"max by (job, instance) (max_over_time({sel(cfg, 'moe_worst_layer_imbalance_ratio')}[{w}]))"),
    ]
    return {"name": RECORDING_GROUP, "rules": _records(rules)}


def deployment_rules(cfg: MixinConfig) -> dict:
    """The deployment-wide recording rules and, after them in the same group, the alert that reads them."""
    return {"name": DEPLOYMENT_GROUP,
            "rules": [*_records(deployment_recording_rules(cfg)), _deployment_ep_rank_imbalance(cfg)]}


def deployment_recording_rules(cfg: MixinConfig) -> list[tuple[str, str]]:
    """Per deployment (targets with cfg.deployment_label): the summed EP-rank and expert rates and their
    max/mean per layer. Targets without the label are left out (they are not part of a multi-sidecar model)."""
    w, by = cfg.rate_window, deployment_by(cfg)

    def summed(counter: str, label: str) -> str:
        return f"sum by ({by}, layer, {label}) (rate({sel(cfg, counter, labelled(cfg))}[{w}]))"

    def imbalance(rate: str) -> str:  # NaN for a layer that routed nothing (0 / 0)
        return f"max by ({by}, layer) ({rate})\n/\navg by ({by}, layer) ({rate})"

    return [
        (DEPLOYMENT_EP_RANK_ROUTED_RATE, summed("moe_ep_rank_routed_tokens_total", "ep_rank")),
        (DEPLOYMENT_LAYER_EP_RANK_IMBALANCE, imbalance(DEPLOYMENT_EP_RANK_ROUTED_RATE)),
        # 1 - sum_l mean_l / sum_l max_l: the busiest rank sets each layer's expert time; layers that routed
        # nothing add 0 to both sums
        (DEPLOYMENT_EP_EXPERT_TIME_LOST,
         f"1 - (\n  sum by ({by}) (avg by ({by}, layer) ({DEPLOYMENT_EP_RANK_ROUTED_RATE}))\n  /\n"
         f"  sum by ({by}) (max by ({by}, layer) ({DEPLOYMENT_EP_RANK_ROUTED_RATE}))\n)"),
        # T2 (--expert-series all on every sidecar of the deployment); nothing is recorded without it.
        (DEPLOYMENT_EXPERT_ROUTED_RATE, summed("moe_expert_routed_tokens_total", "expert")),
        (DEPLOYMENT_LAYER_EXPERT_IMBALANCE, imbalance(DEPLOYMENT_EXPERT_ROUTED_RATE)),
    ]


def loaded(cfg: MixinConfig, gauge: str) -> str:
    """Per layer: `gauge` in the windows where the layer routed at least `cfg.min_expert_load` assignments
    per expert on average. N * top1_share / imbalance_ratio = N * (max/N) / (max/mean) = mean; NaN (too few
    assignments) compares false, so such windows drop out too."""
    mean = (f"{sel(cfg, 'moe_layer_window_routed_tokens')} * {sel(cfg, 'moe_layer_top1_share')}\n"
            f"    / {sel(cfg, 'moe_layer_imbalance_ratio')}")
    return f"{sel(cfg, gauge)}\n  and\n  (\n    {mean}\n  ) >= {_num(cfg.min_expert_load)}"


def sustained(cfg: MixinConfig, gauge: str) -> str:
    """The smallest value of `gauge` over the loaded windows of the last `cfg.rate_window`, per layer."""
    return f"min_over_time((\n  {loaded(cfg, gauge)}\n)[{cfg.rate_window}:])"


def worst_layer(cfg: MixinConfig, gauge: str, threshold: float) -> str:
    """Per instance: the largest sustained value of `gauge` over its layers, above `threshold`. Aggregating
    `without (layer)` keeps one alert per instance however the worst layer moves, and the target labels."""
    return f"max without (layer) (\n{_indent(sustained(cfg, gauge))}\n) > {_num(threshold)}"


def alert_rules(cfg: MixinConfig) -> dict:
    alerts = [
        _imbalance(cfg), _hot_expert(cfg), _dead_experts(cfg), _ep_rank_imbalance(cfg), _step_time(cfg),
        _sidecar_down(cfg), _segments_stale(cfg), _silent_layer(cfg), _captures_failing(cfg), _profiler_disabled(cfg),
        _eplb_stalled(cfg),
    ]
    return {"name": ALERTING_GROUP, "rules": alerts}


def rules_document(cfg: MixinConfig) -> dict:
    doc = {"groups": [recording_rules(cfg), deployment_rules(cfg), alert_rules(cfg)]}
    check_rule_order(doc)
    return doc


def check_rule_order(doc: dict) -> None:
    """Raise ValueError when a rule reads a recording rule that is not recorded before it in its own group: its
    result would depend on the order in which groups happen to run."""
    recorded = {r["record"]: g["name"] for g in doc["groups"] for r in g["rules"] if "record" in r}
    for group in doc["groups"]:
        before: set[str] = set()
        for rule in group["rules"]:
            for name in recorded:
                if re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", rule["expr"]) and name not in before:
                    where = ("later in the same group" if recorded[name] == group["name"]
                             else f"in group {recorded[name]}")
                    raise ValueError(f"{rule.get('record') or rule.get('alert')} (group {group['name']}) reads "
                                     f"{name}, recorded {where}: record it earlier in group {group['name']}")
            if "record" in rule:
                before.add(rule["record"])


# -- alerts --------------------------------------------------------------------------------------------

def _imbalance(cfg: MixinConfig) -> dict:
    return _alert(
        cfg, "MoeExpertImbalanceSustained", "warning", cfg.imbalance_for,
        worst_layer(cfg, "moe_layer_imbalance_ratio", cfg.imbalance_ratio),
        f"MoE expert load imbalanced on {INSTANCE}.",
        f"For {cfg.imbalance_for}, in every loaded window, the busiest expert of some MoE layer received more "
        f"than {_num(cfg.imbalance_ratio)}x the mean expert load (worst layer now at least {VALUE}x). That "
        f"expert sets the pace of every step. Which layer: "
        f"moe_worst_layer_imbalance_ratio{{instance=\"{INSTANCE}\"}}.")


def _hot_expert(cfg: MixinConfig) -> dict:
    return _alert(
        cfg, "MoeHotExpert", "warning", cfg.hot_expert_for,
        f"{sustained(cfg, 'moe_layer_top1_share')}\n> {_num(cfg.hot_expert_share)}",
        f"Hot expert in MoE layer {LAYER} on {INSTANCE}.",
        f"For {cfg.hot_expert_for}, one expert of layer {LAYER} received at least "
        f"{{{{ $value | humanizePercentage }}}} of the layer's assignments in every loaded window (threshold "
        f"{_pct(cfg.hot_expert_share)}; balanced is 1/experts). Its id: "
        f"moe_layer_top_expert_id{{instance=\"{INSTANCE}\", layer=\"{LAYER}\", rank=\"1\"}} "
        "(--expert-series top or all).")


def _dead_experts(cfg: MixinConfig) -> dict:
    return _alert(
        cfg, "MoeDeadExperts", "warning", cfg.dead_experts_for,
        f"{sustained(cfg, 'moe_layer_dead_experts')}\n>= {cfg.dead_experts}",
        f"Dead experts in MoE layer {LAYER} on {INSTANCE}.",
        f"For {cfg.dead_experts_for}, at least {{{{ $value }}}} expert(s) of layer {LAYER} received no "
        f"assignment in any loaded window: their weights serve nothing and the other experts carry their "
        f"share. Which ones: moe_expert_routed_tokens_total (--expert-series all).")


def _ep_rank_imbalance(cfg: MixinConfig) -> dict:
    # A sidecar with the deployment label sees only its node's ranks' tokens: MoeDeploymentEPRankImbalance judges
    # the EP ranks of such a deployment instead.
    return _alert(
        cfg, "MoeEPRankImbalance", "warning", cfg.ep_rank_imbalance_for,
        worst_layer(cfg, "moe_layer_ep_rank_imbalance_ratio", cfg.ep_rank_imbalance_ratio)
        + f"\nunless on (job, instance) {sel(cfg, 'up', labelled(cfg))}",
        f"EP-rank load imbalanced on {INSTANCE}.",
        f"For {cfg.ep_rank_imbalance_for}, in every loaded window, the busiest EP rank of some MoE layer "
        f"served more than {_num(cfg.ep_rank_imbalance_ratio)}x the mean rank load (worst layer now at least "
        f"{VALUE}x): every step waits for that rank. Per layer: "
        f"{LAYER_EP_RANK_IMBALANCE}{{instance=\"{INSTANCE}\"}}.")


def _deployment_ep_rank_imbalance(cfg: MixinConfig) -> dict:
    """The deployment's EP-rank imbalance over cfg.rate_window, in every window in which the deployment's layer
    was loaded (the sum over its sidecars of each one's per-window mean load per expert, N * top1 / ratio, at
    least cfg.min_expert_load; NaN windows left out of the sum), worst layer per deployment. Not while one of
    its sidecars is down: the sum would miss that node's tokens."""
    w, d, by = cfg.rate_window, cfg.deployment_label, deployment_by(cfg)
    mean = (f"{sel(cfg, 'moe_layer_window_routed_tokens', labelled(cfg))}\n"
            f"* {sel(cfg, 'moe_layer_top1_share', labelled(cfg))}\n"
            f"/ {sel(cfg, 'moe_layer_imbalance_ratio', labelled(cfg))}")
    loaded = f"sum by ({by}, layer) (\n  (\n{_indent(mean, '    ')}\n  ) >= 0\n) >= {_num(cfg.min_expert_load)}"
    window = f"{DEPLOYMENT_LAYER_EP_RANK_IMBALANCE}\nand on ({by}, layer)\n{loaded}"
    down = f"min by ({by}) ({sel(cfg, 'up', labelled(cfg))}) == 0"
    name = f"{{{{ $labels.{d} }}}}"
    # the query in the description names the deployment as the alert does: with its scope (namespace="" matches
    # the series of a setup without namespaces)
    scope = "".join(f'{n}="{{{{ $labels.{n} }}}}", ' for n in cfg.deployment_scope_labels)
    return _alert(
        cfg, "MoeDeploymentEPRankImbalance", "warning", cfg.ep_rank_imbalance_for,
        f"max without (layer) (\n  min_over_time((\n{_indent(window, '    ')}\n  )[{w}:])\n) > "
        f"{_num(cfg.ep_rank_imbalance_ratio)}\nunless on ({by})\n({down})",
        f"EP-rank load imbalanced across deployment {name}.",
        f"For {cfg.ep_rank_imbalance_for}, in every loaded window, the busiest EP rank of some MoE layer of "
        f"deployment {name} served more than {_num(cfg.ep_rank_imbalance_ratio)}x the mean rank load over the "
        f"last {w}, all its sidecars' ranks summed (worst layer now at least {VALUE}x): every step of the "
        f"deployment waits for that rank. Per layer: "
        f"{DEPLOYMENT_LAYER_EP_RANK_IMBALANCE}{{{scope}{d}=\"{name}\"}}.")


def _step_time(cfg: MixinConfig) -> dict:
    # The detector keeps a key's last value when its traffic stops: only keys that still average enough
    # steps per window (the detector updates a key only in windows with --min-window-steps) count. Those are
    # timed steps, the sample its mean rests on (1 in MOE_MONITOR_STEP_TIME_EVERY on CUDA), so this counts the
    # histogram's steps, not moe_steps_total: every step would call a key fresh that the detector no longer judges.
    current = sel(cfg, "moe_detector_current", 'signal="step_time"')
    baseline = sel(cfg, "moe_detector_baseline", 'signal="step_time"')
    ratio = f"max without (signal) (\n  {current}\n  /\n  {baseline}\n)"
    steps = (f"rate({sel(cfg, 'moe_step_duration_seconds_count')}[{cfg.rate_window}])\n"
             f"  * ignoring (phase, tokens_le) group_left\n  {sel(cfg, 'moe_window_length_seconds')}")
    # critical, the one alert that pages (deploy/alertmanager/alertmanager.yml): every request on the instance is
    # served that much slower, an outage of capacity rather than a matter of efficiency.
    return _alert(
        cfg, "MoeStepTimeRegression", "critical", cfg.step_time_for,
        f"{ratio} > {_num(cfg.step_time_ratio)}\nand\n(\n  {steps}\n) >= {_num(cfg.step_time_min_window_steps)}",
        f"MoE {{{{ $labels.phase }}}} steps {VALUE}x slower than their baseline on {INSTANCE}.",
        f"For {cfg.step_time_for}, the mean {{{{ $labels.phase }}}} step with at most "
        f"{{{{ $labels.tokens_le }}}} tokens took more than {_num(cfg.step_time_ratio)}x its baseline "
        f"(the sidecar's --step-baseline-quantile of recent windows; now {VALUE}x). "
        f"Same phase and batch size, so a batch-mix shift is not the cause. Compare "
        f"moe_detector_current and moe_detector_baseline{{signal=\"step_time\"}}.")


def _sidecar_down(cfg: MixinConfig) -> dict:
    up = sel(cfg, "up")
    return _alert(
        cfg, "MoeSidecarDown", "warning", cfg.sidecar_down_for,
        f"{up} == 0\nor\nabsent({up})",
        "moe-monitor sidecar down{{ if $labels.instance }} on " + INSTANCE + "{{ end }}.",
        "{{ if $labels.instance }}Prometheus has failed to scrape " + INSTANCE + "{{ else }}No target matching "
        f"{{{cfg.selector}}} has been scraped{{{{ end }}}} for {cfg.sidecar_down_for}: expert load, step times, "
        "the detector and captures of that vLLM instance are unmonitored. vLLM itself may be serving fine.")


def _segments_stale(cfg: MixinConfig) -> dict:
    no_fresh = '{{ if eq $labels.state "fresh" }}'
    bad = sel(cfg, "moe_monitor_segments", 'state=~"stale|unreadable"')
    fresh = sel(cfg, "moe_monitor_segments", 'state="fresh"')
    return _alert(
        cfg, "MoeSegmentsStale", "warning", cfg.segments_stale_for,
        f"{bad} > 0\nor\n{fresh} == 0",
        f"{no_fresh}No fresh vLLM segment{{{{ else }}}}{{{{ $value }}}} {{{{ $labels.state }}}} vLLM "
        f"segment(s){{{{ end }}}} on {INSTANCE}.",
        f"{no_fresh}For {cfg.segments_stale_for}, no vLLM rank has published routing counts to the sidecar: "
        f"vLLM is down or still loading, or the plugin is not loaded (MOE_MONITOR_SEGMENT_DIR).{{{{ else }}}}"
        f"For {cfg.segments_stale_for}, {{{{ $value }}}} segment file(s) have been {{{{ $labels.state }}}}: "
        f"a rank stopped publishing or a file cannot be read, and its load is missing from every "
        f"figure.{{{{ end }}}} Per segment: moe_monitor_segment_up{{instance=\"{INSTANCE}\"}}.")


def _silent_layer(cfg: MixinConfig) -> dict:
    w = cfg.rate_window
    return _alert(
        cfg, "MoeLayerSilent", "warning", cfg.silent_layer_for,
        f"(\n  max_over_time({sel(cfg, 'moe_layer_window_routed_tokens')}[{w}]) == 0\n"
        f"  and on (job, instance, layer) {sel(cfg, 'moe_layer_observable')} == 1\n)\n"
        f"and on (job, instance)\n  min_over_time({sel(cfg, 'moe_window_routed_tokens')}[{w}]) > 0",
        f"MoE layer {LAYER} counts nothing on {INSTANCE} while tokens flow.",
        f"For {cfg.silent_layer_for}, layer {LAYER} routed no assignment in any window while the instance's other "
        f"layers routed tokens in every one. moe-monitor reports the layer as observable, so its counts should "
        f"not be zero: the plugin no longer sees that layer's routing (its MoE kernel was rebuilt, or another "
        f"user of the router's hook replaced moe-monitor's). That layer's balance figures and alerts are blind.")


def _captures_failing(cfg: MixinConfig) -> dict:
    failed = sel(cfg, "moe_captures_total", f'outcome=~"{"|".join(cfg.capture_failure_outcomes)}"')
    w = cfg.capture_failures_window
    # A (reason, outcome) series is born at 1 on its first capture, which increase() cannot see: a series that
    # did not exist one window ago counts with its whole value, an older one with its increase.
    return _alert(
        cfg, "MoeCapturesFailing", "warning", None,
        f"sum without (reason) (\n  (increase({failed}[{w}]) and {failed} offset {w})\n  or\n"
        f"  ({failed} unless {failed} offset {w})\n) >= {cfg.capture_failures}",
        f"Profiler captures ending in {{{{ $labels.outcome }}}} on {INSTANCE}.",
        '{{ $value | printf "%.0f" }}' f" capture(s) ended in {{{{ $labels.outcome }}}} in the last {w}: "
        f"regressions are not captured with their evidence. moe-monitor traces list shows them; the sidecar "
        f"log says why.")


def _profiler_disabled(cfg: MixinConfig) -> dict:
    return _alert(
        cfg, "MoeProfilerDisabled", "info", None,
        f"{sel(cfg, 'moe_capture_profiler_enabled')} == 0",
        f"vLLM profiler disabled: no captures for {INSTANCE}.",
        "vLLM answered /start_profile with 404 (started without --profiler-config): automatic and manual "
        "captures end as profiler_disabled. Monitoring continues; restart vLLM with --profiler-config to get "
        "traces.")


def _eplb_stalled(cfg: MixinConfig) -> dict:
    """Two arms, each labelled `stall`: overdue (steps flow, vLLM's counter at eplb_stall_intervals x the interval
    or more: the rearrangement due one interval ago or more never came, which is how a stalled async
    rearrangement looks) and hung (a sync rearrangement in progress for eplb_hung_after_seconds: the engine waits
    inside it; async ones are left to the first arm, since they only progress while steps flow)."""
    w, n = cfg.rate_window, cfg.eplb_stall_intervals
    overdue = sel(cfg, "moe_eplb_rearrangement_overdue_steps")
    interval = sel(cfg, "moe_eplb_rearrangement_interval_steps")
    since = sel(cfg, "moe_eplb_steps_since_rearrangement")
    running = sel(cfg, "moe_eplb_rearrangement_in_progress_seconds")
    sync = sel(cfg, "moe_eplb_info", 'mode="sync"')
    hung = '{{ if eq $labels.stall "hung" }}'
    return _alert(
        cfg, "MoeEplbRearrangementStalled", "warning", cfg.eplb_stalled_for,
        f"max without (segment) (\n  label_replace(\n"
        f"    {overdue} > 0\n    and {overdue} >= {_num(n - 1)} * {interval}\n"
        f"    and delta({since}[{w}]) > 0,\n    \"stall\", \"overdue\", \"\", \"\"\n  )\n)\nor\n"
        f"max without (segment) (\n  label_replace(\n    {running} > {_num(cfg.eplb_hung_after_seconds)}\n"
        f"    and on (job, instance, segment) {sync} == 1,\n    \"stall\", \"hung\", \"\", \"\"\n  )\n)",
        f"vLLM's EPLB rearrangement {hung}hung{{{{ else }}}}overdue{{{{ end }}}} on {INSTANCE}.",
        f"{hung}A synchronous EPLB rearrangement has been in progress for {VALUE}s (they take about a second): "
        f"the engine waits inside it, no step runs.{{{{ else }}}}Steps flow, but the EPLB rearrangement vLLM "
        f"should have started {VALUE} steps ago has not started ({_num(n)} x its step_interval or more since the "
        f"last one began): an async rearrangement that never finished keeps vLLM from starting the next, silently, "
        f"and the expert placement no longer follows the load.{{{{ end }}}} Per rank: "
        f"moe_eplb_rearrangement_overdue_steps and moe_eplb_rearrangement_in_progress_seconds on {INSTANCE}.")


def _records(rules: list[tuple[str, str]]) -> list[dict]:
    return [{"record": name, "expr": expr} for name, expr in rules]


def _alert(cfg: MixinConfig, name: str, severity: str, for_: str | None, expr: str, summary: str,
           description: str) -> dict:
    rule = {"alert": name, "expr": expr}
    if for_ and any(c not in "0ywdhms" for c in for_):  # "0s", "0m": no for at all
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": description,
                           "runbook_url": f"{cfg.runbook_url}#{name.lower()}"}
    return rule


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _num(x: float) -> str:
    return f"{x:g}"


def _pct(x: float) -> str:
    return f"{x * 100:g}%"
