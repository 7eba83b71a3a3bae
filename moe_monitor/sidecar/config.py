"""The sidecar's one configuration object. Every field that is a setting declares its flag, help and limits
here (moe_monitor/settings.py); the CLI builds `moe-monitor serve`'s options from these fields, each with its
`MOE_MONITOR_*` environment twin, and docs/configuration.md is generated from them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_monitor.capture.alerts import Peer, parse_peers
from moe_monitor.detect.detector import DetectorConfig
from moe_monitor.settings import setting

EXPERT_SERIES = ("none", "all", "top")


@dataclass(frozen=True)
class SidecarConfig:
    segment_dir: str = setting("/dev/shm/moe-monitor", "--segment-dir", "Directory the vLLM plugin writes per-rank "
                               "segments into (shared with the vLLM pod).", path="dir")
    listen: str = setting("0.0.0.0:9464", "--listen", "HOST:PORT for /metrics and the captures API.")
    http_idle_timeout_s: float = setting(15.0, "--http-idle-timeout", "Seconds a kept-alive connection may stay "
                                         "without a new request after a response (Prometheus retries a scrape on "
                                         "a connection closed while idle).", minimum=0.1, group="http")
    http_header_timeout_s: float = setting(10.0, "--http-header-timeout", "Seconds a new connection has to send "
                                           "its first request's headers (slow clients are closed).", minimum=0.1,
                                           group="http")
    http_max_connections: int = setting(256, "--http-max-connections", "Open connections at most (fewer under a "
                                        "low `ulimit -n`; logged at start); at the cap the oldest idle one is "
                                        "closed to admit a new one.", minimum=1, group="http")
    window_s: float = setting(5.0, "--window", "Window length in seconds; the exposition is rebuilt once per "
                              "window, at wall-clock multiples of it.", minimum=0.1)
    stale_after_s: float = setting(30.0, "--stale-after", "Seconds without a snapshot before a rank counts as "
                                   "stale.", minimum=0.1)
    rank_series: bool = setting(True, "--rank-series", "T1: per layer x EP-rank token counters.", group="series")
    load_histogram: bool = setting(True, "--load-histogram", "T1: per-window expert-load histogram per layer.",
                                   group="series")
    expert_series: str = setting("none", "--expert-series", "T2: the top-K hot experts per layer (top), or those "
                                 "and per layer x expert counters (all).", choices=EXPERT_SERIES, group="series")
    top_experts: int = setting(5, "--top-experts", "K of the top-K experts (--expert-series top or all).", minimum=1,
                               group="series")
    hot_multiple: float = setting(2.0, "--hot-multiple", "An expert is hot when its window load exceeds this "
                                  "multiple of the layer's mean.", minimum=1.0, group="series")
    min_window_assignments: int = setting(100, "--min-window-assignments", "Below this many assignments in a "
                                          "window a layer's statistics are NaN.", minimum=1, group="series")
    placement_file: str | None = setting(None, "--placement", "JSON logical->physical expert map, for ranks that "
                                         "publish none (with vLLM's EPLB the plugin publishes the live one); "
                                         "default: experts split contiguously over the EP ranks.", path="file",
                                         group="series")
    max_series: int = setting(20000, "--max-series", "Series budget: T2, then T1 are dropped beyond it "
                              "(moe_monitor_series_truncated says so).", minimum=100, group="series")
    flight_minutes: float = setting(10.0, "--flight-minutes", "Routing flight recorder: minutes of closed windows "
                                    "(layer x expert counts, EP-rank load, steps) kept in memory, stored with "
                                    "every capture and served at /api/flight; 0 turns it off.", minimum=0.0)
    flight_max_bytes: int = setting(64 << 20, "--flight-max-bytes", "Routing flight recorder: bytes of JSON it "
                                    "keeps at most; a model of many layers x experts in short windows keeps fewer "
                                    "than --flight-minutes (logged once).", minimum=1 << 20)
    max_segment_bytes: int | None = setting(None, "--max-segment-bytes", "Refuse segments larger than this "
                                            "(default 256 MiB).", minimum=4096)
    profile_dir: str | None = setting(None, "--profile-dir", "vLLM's torch_profiler_dir (--profiler-config): the "
                                      "newest capture there is analysed and its kernel breakdown exported "
                                      "(moe_capture_*).", path="dir", group="captures")
    vllm_url: str | None = setting(None, "--vllm-url", "vLLM's OpenAI server URL; with --profile-dir turns on "
                                   "captures through /start_profile.", group="captures")
    vllm_api_key: str | None = setting(None, "--vllm-api-key", "Bearer key for a vLLM started with --api-key.",
                                       secret=True, group="captures")
    capture_dir: str = setting("/var/lib/moe-monitor/captures", "--capture-dir", "Trace catalog directory.",
                               path="dir", group="captures")
    capture_iterations: int = setting(5, "--capture-iterations", "Engine steps per capture (max_iterations).",
                                      minimum=1, group="captures")
    capture_timeout_s: float = setting(120.0, "--capture-timeout", "Seconds a whole capture may take (start, "
                                       "profile, traces); every call to vLLM gets at most the time left.",
                                       minimum=1, group="captures")
    capture_run_s: float = setting(10.0, "--capture-max-seconds", "A profile that has not ended by itself after "
                                   "this many seconds is stopped with /stop_profile (vLLM before 0.32 ignores "
                                   "max_iterations in the request).", minimum=0.5, group="captures")
    max_captures: int = setting(20, "--max-captures", "Retention: captures kept.", minimum=1, group="captures")
    max_capture_bytes: int = setting(2 * 1024**3, "--max-capture-bytes", "Retention: disk quota of the catalog, "
                                     "never exceeded.", minimum=1, group="captures")
    max_capture_age_s: float = setting(7 * 24 * 3600.0, "--max-capture-age", "Retention: seconds a capture is "
                                       "kept.", minimum=60, group="captures")
    api_token: str | None = setting(None, "--api-token", "Bearer token every /api/ route requires (captures, "
                                    "traces, flight record); /metrics and /healthz stay open.", secret=True,
                                    group="captures")
    captures_api_insecure: bool = setting(False, "--captures-api-insecure", "Without --api-token, open every /api/ "
                                          "route to anyone who reaches the port: list, trigger captures, download "
                                          "traces, read flight records (trusted networks only; logged loudly). "
                                          "Off: they answer 403 until a token is set.", group="captures")
    alert_instances: str | None = setting(None, "--alert-instances", "Alertmanager's alerts (POST /api/alerts) are "
                                          "captured only when their instance label is one of these (comma-separated "
                                          "HOST:PORT, as Prometheus scrapes this sidecar) or absent; others are "
                                          "answered other_instance. Unset: any instance (one sidecar per "
                                          "receiver).", group="captures")
    alert_peers: str | None = setting(None, "--alert-peers", "With --alert-instances: comma-separated NAME:PORT of "
                                      "the sidecars beside this one (a headless Service's DNS name); an "
                                      "other_instance alert whose instance label is IP:PORT with PORT an entry's "
                                      "and IP among that NAME's addresses now is sent on to that sidecar's "
                                      "/api/alerts (docs/incidents.md). Unset: never sent on.", group="captures")
    detector: DetectorConfig = setting(None, "", "", factory=DetectorConfig)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0] or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def flight_windows(self) -> int:
        """Windows the flight recorder keeps: --flight-minutes of --window."""
        return math.ceil(self.flight_minutes * 60 / self.window_s - 1e-9) if self.flight_minutes > 0 else 0

    @property
    def alert_instance_set(self) -> frozenset[str]:
        """--alert-instances as a set; empty: alerts of any instance are this sidecar's."""
        return frozenset(x.strip() for x in (self.alert_instances or "").split(",") if x.strip())

    @property
    def alert_peer_list(self) -> tuple[Peer, ...]:
        """--alert-peers parsed; empty: alerts are never sent on."""
        return parse_peers(self.alert_peers) if self.alert_peers else ()

    @property
    def captures_enabled(self) -> bool:
        return bool(self.vllm_url and self.profile_dir)

    def __post_init__(self) -> None:
        if self.expert_series not in EXPERT_SERIES:
            raise ValueError(f"expert_series must be one of {EXPERT_SERIES}, got {self.expert_series!r}")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")
        _, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen: {self.listen!r} is not HOST:PORT (e.g. 0.0.0.0:9464)")
        if self.alert_peers:
            if not self.alert_instance_set:
                raise ValueError("alert_peers needs --alert-instances: a sidecar sends on only the alerts it knows "
                                 "are another instance's")
            parse_peers(self.alert_peers)  # ValueError naming a bad entry
