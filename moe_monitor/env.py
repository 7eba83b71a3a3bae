"""Every environment variable moe-monitor reads, in one place (the OpenTelemetry convention).

The plugin runs inside vLLM and must never raise there: `env_float`/`env_bool` log a bad value and fall back
to the default. The sidecar's CLI flags have these same names as their environment twins (see cli.py).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Shared by plugin and sidecar.
SEGMENT_DIR = "MOE_MONITOR_SEGMENT_DIR"
DEFAULT_SEGMENT_DIR = "/dev/shm/moe-monitor"

# Plugin (read inside every vLLM worker).
ENABLED = "MOE_MONITOR_ENABLED"  # "0" turns the plugin into a no-op without uninstalling it
PUBLISH_INTERVAL = "MOE_MONITOR_PUBLISH_INTERVAL"  # seconds between snapshots
DEFAULT_PUBLISH_INTERVAL = 1.0
RECORDER = "MOE_MONITOR_RECORDER"  # per_layer | deferred | fused | staged; default: fused on CUDA, per_layer on CPU

# Sidecar (each also a `moe-monitor serve` flag).
LISTEN = "MOE_MONITOR_LISTEN"
DEFAULT_LISTEN = "0.0.0.0:9464"
WINDOW = "MOE_MONITOR_WINDOW"
RANK_SERIES = "MOE_MONITOR_RANK_SERIES"
LOAD_HISTOGRAM = "MOE_MONITOR_LOAD_HISTOGRAM"
EXPERT_SERIES = "MOE_MONITOR_EXPERT_SERIES"
TOP_EXPERTS = "MOE_MONITOR_TOP_EXPERTS"
HOT_MULTIPLE = "MOE_MONITOR_HOT_MULTIPLE"
MIN_WINDOW_ASSIGNMENTS = "MOE_MONITOR_MIN_WINDOW_ASSIGNMENTS"
PLACEMENT = "MOE_MONITOR_PLACEMENT"
MAX_SERIES = "MOE_MONITOR_MAX_SERIES"
PROFILE_DIR = "MOE_MONITOR_PROFILE_DIR"
VLLM_URL = "MOE_MONITOR_VLLM_URL"
VLLM_API_KEY = "MOE_MONITOR_VLLM_API_KEY"
CAPTURE_DIR = "MOE_MONITOR_CAPTURE_DIR"
CAPTURE_ITERATIONS = "MOE_MONITOR_CAPTURE_ITERATIONS"
CAPTURE_TIMEOUT = "MOE_MONITOR_CAPTURE_TIMEOUT"
CAPTURE_MAX_SECONDS = "MOE_MONITOR_CAPTURE_MAX_SECONDS"
MAX_CAPTURES = "MOE_MONITOR_MAX_CAPTURES"
MAX_CAPTURE_BYTES = "MOE_MONITOR_MAX_CAPTURE_BYTES"
MAX_CAPTURE_AGE = "MOE_MONITOR_MAX_CAPTURE_AGE"
API_TOKEN = "MOE_MONITOR_API_TOKEN"
CAPTURES_API_INSECURE = "MOE_MONITOR_CAPTURES_API_INSECURE"
STEP_MARGIN = "MOE_MONITOR_STEP_MARGIN"
STEP_BASELINE_QUANTILE = "MOE_MONITOR_STEP_BASELINE_QUANTILE"
CONSECUTIVE_WINDOWS = "MOE_MONITOR_CONSECUTIVE_WINDOWS"
WARMUP_WINDOWS = "MOE_MONITOR_WARMUP_WINDOWS"
BASELINE_WINDOWS = "MOE_MONITOR_BASELINE_WINDOWS"
MIN_WINDOW_STEPS = "MOE_MONITOR_MIN_WINDOW_STEPS"
IMBALANCE_THRESHOLD = "MOE_MONITOR_IMBALANCE_THRESHOLD"
IMBALANCE_RISE = "MOE_MONITOR_IMBALANCE_RISE"
CAPTURE_COOLDOWN = "MOE_MONITOR_CAPTURE_COOLDOWN"
MAX_CAPTURES_PER_HOUR = "MOE_MONITOR_MAX_CAPTURES_PER_HOUR"
SIDECAR_URL = "MOE_MONITOR_URL"
STALE_AFTER = "MOE_MONITOR_STALE_AFTER"
DEFAULT_STALE_AFTER = 30.0
MAX_SEGMENT_BYTES = "MOE_MONITOR_MAX_SEGMENT_BYTES"
LOG_LEVEL = "MOE_MONITOR_LOG_LEVEL"


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:  # also rejects nan
        log.warning("ignoring %s=%r: expected a number >= %s; using %s", name, raw, minimum, default)
        return default
    return value


def env_choice(name: str, choices: tuple[str, ...]) -> str | None:
    """The variable's value when it is one of `choices`; None (and a warning) otherwise."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in choices:
        log.warning("ignoring %s=%r: expected one of %s; using the default", name, raw, ", ".join(choices))
        return None
    return raw


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    log.warning("ignoring %s=%r: expected 0/1/true/false; using %s", name, raw, default)
    return default
