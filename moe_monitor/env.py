"""Every environment variable moe-monitor reads, in one place (the OpenTelemetry convention).

The plugin runs inside vLLM and must never raise there: `env_float`/`env_bool` log a bad value and fall back
to the default. The sidecar's `serve` settings derive theirs from their flags (moe_monitor/settings.py).
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
STEP_TIME_EVERY = "MOE_MONITOR_STEP_TIME_EVERY"  # time one engine step in N (pseudo-random); every step counts
DEFAULT_STEP_TIME_EVERY_CUDA = 16  # each timed step costs driver calls on vLLM's thread (docs/recorder.md, "Cost")
DEFAULT_STEP_TIME_EVERY_CPU = 1  # a perf_counter pair: every step
RECORDER = "MOE_MONITOR_RECORDER"  # per_layer (CPU) | fused | staged (CUDA); default: fused on CUDA, per_layer on CPU

# Sidecar: every `moe-monitor serve` setting's variable is derived from its flag (moe_monitor/settings.py,
# docs/configuration.md); these are the ones the other commands read.
API_TOKEN = "MOE_MONITOR_API_TOKEN"
SIDECAR_URL = "MOE_MONITOR_URL"
CLIENT_TIMEOUT = "MOE_MONITOR_CLIENT_TIMEOUT"  # seconds an answer may take in all (traces, eplb)
LOG_LEVEL = "MOE_MONITOR_LOG_LEVEL"


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    return _env_number(name, default, minimum, float, "a number")


def env_int(name: str, default: int, minimum: int = 0) -> int:
    return _env_number(name, default, minimum, int, "a whole number")


def _env_number(name, default, minimum, parse, what: str):
    """parse(value) when it is >= minimum; anything else (nan included) is logged and the default used."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # `not >=` also rejects nan
        log.warning("ignoring %s=%r: expected %s >= %s; using %s", name, raw, what, minimum, default)
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
