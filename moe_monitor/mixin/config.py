"""Every threshold and knob of the alerting rules, in one place: `MixinConfig`, overridable from a TOML file.

The keys of the TOML file are the field names below (flat, no tables):

    imbalance_ratio = 3.0
    imbalance_for = "30m"
    selector = 'job="vllm-moe", namespace="inference"'

Durations are Prometheus durations ("30s", "15m", "1h30m"). docs/alerts.md explains each knob.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass

from moe_monitor.schema.vocabulary import CAPTURE_OUTCOMES as _OUTCOMES
from moe_monitor.schema.vocabulary import METRICS as _METRICS

RUNBOOK_URL = "https://github.com/moe-monitor/moe-monitor/blob/main/docs/runbooks.md"

# Outcomes of moe_captures_total (docs/captures.md). `ok` is success, `skipped_busy` a capture already
# running (not a failure), `profiler_disabled` has an alert of its own (MoeProfilerDisabled).
CAPTURE_OUTCOMES = tuple(_OUTCOMES)

_DURATION = re.compile(r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$")
_MATCHER = r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*'
_SELECTOR = re.compile(rf"^({_MATCHER}(,{_MATCHER})*,?\s*)?$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels the deployment label cannot be: Prometheus' own and every label the sidecar exports.
_TAKEN_LABELS = tuple(sorted({"job", "instance", "le", "quantile", "alertname", "alertstate", "severity",
                               *(n for m in _METRICS for n in m.labels)}))


class ConfigError(ValueError):
    """A bad mixin configuration; the message names the key and what was expected."""


@dataclass(frozen=True)
class MixinConfig:
    # Label matchers (PromQL, without braces) that select the sidecars' series, in every expression.
    selector: str = 'job="moe-monitor"'
    # Range of every rate() in the recording rules, and how far back the routing alerts look for loaded
    # windows: a gap of idle or NaN windows shorter than this does not reset their `for`. Recording rule
    # names keep "5m" whatever this is (the dashboards depend on the names); change it for tests only.
    rate_window: str = "5m"
    runbook_url: str = RUNBOOK_URL
    # Where a Grafana user's browser reaches a sidecar's trace API (capture links on the dashboards);
    # {instance} is the scraped instance label. In Kubernetes, point it at an ingress or a port-forward.
    trace_api_url: str = "http://{instance}"
    # Target label naming the deployment a sidecar belongs to when one model's ranks span several pods/nodes (one
    # sidecar per node): the deployment recording rules, MoeDeploymentEPRankImbalance and the MoE deployment
    # dashboard sum the sidecars that share its value. Set it by relabeling (deploy/kubernetes/multinode/); targets
    # without it are left out of those figures. Recording rule names do not change with it.
    deployment_label: str = "deployment"
    # Target labels kept, beside job, through every deployment-wide aggregation (the deployment recording rules and
    # MoeDeploymentEPRankImbalance): deployments are told apart by them too, and the alert carries them. `namespace`
    # because prometheus-operator's AlertmanagerConfig routes only alerts labelled with its own namespace. Grouping
    # by a label a series lacks changes nothing, so targets without them get the same series as with ().
    deployment_scope_labels: tuple[str, ...] = ("namespace",)

    # Routing alerts read the per-window gauges of the layers whose window was "loaded": on average at least
    # this many assignments per expert (below it max/mean and dead counts are mostly chance). Windows below
    # the sidecar's --min-window-assignments are NaN and never count. 0: only the sidecar's own cut.
    min_expert_load: float = 20.0
    imbalance_ratio: float = 2.0  # worst layer's max/mean expert load (moe_layer_imbalance_ratio)
    imbalance_for: str = "15m"
    hot_expert_share: float = 0.25  # one expert's share of a layer's assignments (moe_layer_top1_share)
    hot_expert_for: str = "15m"
    dead_experts: int = 1  # experts of a layer with no assignment in every loaded window
    dead_experts_for: str = "30m"
    ep_rank_imbalance_ratio: float = 1.5  # worst layer's max/mean EP-rank load
    ep_rank_imbalance_for: str = "15m"

    # Step time: the sidecar detector's like-with-like figures, current window / baseline (median), per
    # (phase, tokens_le); only keys that average at least step_time_min_window_steps timed steps per window (the
    # step histogram's: the detector's --min-window-steps counts those).
    step_time_ratio: float = 1.5
    step_time_min_window_steps: float = 10.0
    step_time_for: str = "15m"

    # Health of the sidecar and the channel.
    sidecar_down_for: str = "5m"
    segments_stale_for: str = "15m"
    # Self-test against silent zeros: an observable layer that routes nothing in any window of rate_window while
    # the instance routes tokens in every one, for this long.
    silent_layer_for: str = "10m"
    # vLLM's EPLB (MoeEplbRearrangementStalled): steps flow and vLLM's steps-since-rearrangement counter stands at
    # eplb_stall_intervals x its step interval or more (no rearrangement completed for that many intervals: an
    # async one that never finishes), or a sync rearrangement has been in progress for eplb_hung_after_seconds
    # (the engine is blocked inside it); for eplb_stalled_for.
    eplb_stall_intervals: float = 2.0
    eplb_hung_after_seconds: float = 300.0
    eplb_stalled_for: str = "5m"

    # Captures: at least capture_failures captures ending in one of these outcomes within the window.
    capture_failure_outcomes: tuple[str, ...] = ("partial", "analysis_failed", "no_trace", "start_failed",
                                                 "vllm_busy", "over_quota", "store_failed", "error")
    capture_failures: int = 1
    capture_failures_window: str = "1h"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_for", "_window")) and not (isinstance(value, str) and value
                                                             and _DURATION.match(value)):
                raise ConfigError(f"{f.name}: {value!r} is not a Prometheus duration (e.g. \"30s\", \"15m\", \"1h\")")
            if f.name.endswith("_window") and not any(c in "123456789" for c in value):
                raise ConfigError(f"{f.name}: a range cannot be {value!r}")
        if not _SELECTOR.match(self.selector):
            raise ConfigError(f"selector: {self.selector!r} is not a list of PromQL label matchers "
                              "(e.g. 'job=\"moe-monitor\", namespace=\"inference\"')")
        if not _free_label(self.deployment_label):
            raise ConfigError(f"deployment_label: {self.deployment_label!r} is not a free Prometheus label name "
                              f"(letters, digits, _; not __* nor one of {', '.join(_TAKEN_LABELS)})")
        bad = [n for n in self.deployment_scope_labels if not _free_label(n) or n == self.deployment_label]
        if bad or len(set(self.deployment_scope_labels)) < len(self.deployment_scope_labels):
            raise ConfigError(f"deployment_scope_labels: {bad or list(self.deployment_scope_labels)} are not distinct "
                              f"free Prometheus label names other than deployment_label {self.deployment_label!r} "
                              f"(letters, digits, _; not __* nor one of {', '.join(_TAKEN_LABELS)})")
        _at_least("min_expert_load", self.min_expert_load, 0)
        _at_least("imbalance_ratio", self.imbalance_ratio, 1)
        _at_least("eplb_stall_intervals", self.eplb_stall_intervals, 1)
        _at_least("eplb_hung_after_seconds", self.eplb_hung_after_seconds, 0)
        _at_least("ep_rank_imbalance_ratio", self.ep_rank_imbalance_ratio, 1)
        _at_least("step_time_ratio", self.step_time_ratio, 1)
        _at_least("step_time_min_window_steps", self.step_time_min_window_steps, 0)
        _at_least("dead_experts", self.dead_experts, 1)
        _at_least("capture_failures", self.capture_failures, 1)
        if not 0 < self.hot_expert_share <= 1:
            raise ConfigError(f"hot_expert_share: {self.hot_expert_share!r} must be in (0, 1]")
        bad = [o for o in self.capture_failure_outcomes if o not in CAPTURE_OUTCOMES or o == "ok"]
        if bad or not self.capture_failure_outcomes:
            raise ConfigError(f"capture_failure_outcomes: {bad or '[]'} not allowed; choose among "
                              f"{[o for o in CAPTURE_OUTCOMES if o != 'ok']}")
        if not self.trace_api_url.startswith(("http://", "https://")):
            raise ConfigError(f"trace_api_url: {self.trace_api_url!r} is not an http(s) URL")
        if not self.runbook_url.startswith(("http://", "https://")):
            raise ConfigError(f"runbook_url: {self.runbook_url!r} is not an http(s) URL")


def _free_label(name: str) -> bool:
    """A label name the mixin may group by: valid, not Prometheus' reserved __*, none of _TAKEN_LABELS."""
    return bool(_LABEL.match(name)) and not name.startswith("__") and name not in _TAKEN_LABELS


def _at_least(name: str, value: float, low: float) -> None:
    if not math.isfinite(value) or value < low:
        raise ConfigError(f"{name}: {value!r} must be at least {low}")


def load_config(path: str | None = None) -> MixinConfig:
    """The defaults, overridden by the TOML file at `path` (None: the defaults). Raises ConfigError."""
    if path is None:
        return MixinConfig()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return config_from_dict(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_from_dict(doc: dict) -> MixinConfig:
    """The defaults overridden by `doc` (a parsed TOML document). Raises ConfigError."""
    defaults = {f.name: f.default for f in dataclasses.fields(MixinConfig)}
    values = {}
    for key, value in doc.items():
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(sorted(defaults))}"
            raise ConfigError(f"unknown key {key!r}{hint}")
        values[key] = _typed(key, value, defaults[key])
    return MixinConfig(**values)


def _typed(key: str, value, default):
    """`value` converted to the type of `default` (int -> float allowed), or ConfigError."""
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, tuple) and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    expected = {float: "a number", int: "an integer", str: "a string", tuple: "a list of strings"}[type(default)]
    raise ConfigError(f"{key}: expected {expected}, got {_kind(value)} {value!r}")


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "a table"}.get(type(value), type(value).__name__)
