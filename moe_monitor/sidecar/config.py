"""The sidecar's one configuration object, built once by the CLI from flags and MOE_MONITOR_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_monitor.detect.detector import DetectorConfig

EXPERT_SERIES = ("none", "all", "top")


@dataclass(frozen=True)
class SidecarConfig:
    segment_dir: str = "/dev/shm/moe-monitor"
    host: str = "0.0.0.0"
    port: int = 9464
    stale_after_s: float = 30.0
    max_segment_bytes: int | None = None
    window_s: float = 5.0  # window length; the exposition is rebuilt once per window
    rank_series: bool = True  # T1: per layer x EP-rank token counters
    load_histogram: bool = True  # T1: per-window expert-load histogram per layer
    expert_series: str = "none"  # T2: none | all (layer x expert counters) | top (top-K hot experts)
    top_experts: int = 5  # K for expert_series=top
    hot_multiple: float = 2.0  # an expert is hot when its window load exceeds this multiple of the mean
    min_window_assignments: int = 100  # below this a layer's window statistics are NaN
    placement_file: str | None = None  # logical->physical expert map (EPLB); default: contiguous over EP ranks
    max_series: int = 20000  # hard budget; T2 then T1 are dropped first, and truncation is reported
    profile_dir: str | None = None  # vLLM's torch_profiler_dir: the newest capture's breakdown is exported
    # Captures (on when vllm_url and profile_dir are set)
    vllm_url: str | None = None
    vllm_api_key: str | None = None
    capture_dir: str = "/var/lib/moe-monitor/captures"
    capture_iterations: int = 5
    capture_timeout_s: float = 120.0
    max_captures: int = 20
    max_capture_bytes: int = 2 * 1024**3
    max_capture_age_s: float = 7 * 24 * 3600
    api_token: str | None = None  # bearer token required to download traces and trigger captures
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    capture_run_s: float = 10.0  # a profile that has not ended by itself after this is stopped
    captures_api_insecure: bool = False  # without api_token: allow trigger/download anyway (trusted networks)

    @property
    def captures_enabled(self) -> bool:
        return bool(self.vllm_url and self.profile_dir)

    def __post_init__(self) -> None:
        if self.expert_series not in EXPERT_SERIES:
            raise ValueError(f"expert_series must be one of {EXPERT_SERIES}, got {self.expert_series!r}")
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")
