"""Regression detector: closed windows in, capture decisions (with their evidence) out. Pure, no I/O.

Step time is compared like with like: the mean step duration of each (phase, tokens-per-step bucket) in the
window against the same key over the recent history, so a shift in the batch mix (more prefill, bigger
batches) is not a regression. The step-time baseline is a high quantile (p90 by default) of that history, the
slow end of normal, not its median: a host's speed drifts for minutes at a time (every key 20-30 % faster for
~85 s, then back, on a 2-vCPU VM), and against a median pulled down by a fast spell the return to normal reads as
a regression. The gap between p90 and the median is the host's own window-to-window spread (9-32 % per key on
that VM), so a steadier host gets a tighter baseline.
A window must also clear the key's median by `step_noise_sigmas` (3) robust standard deviations (1.4826 x MAD of
the same history): p90 x (1 + margin) is a fixed multiple of the slow end of normal, too tight for a key whose
windows wander by a third either way (few steps, other jobs on a small CPU host: steady decode traffic there
reaches +35 % over p90); the spread bar is what such a key needs, and on a steady key (spread under ~20 %) the
margin still sets the bar. docs/captures.md has the measurements behind these choices.
Imbalance is compared with an absolute threshold and with its own recent median. A signal fires after
`consecutive` windows in a row exceed, each with enough samples; idle windows neither count nor break a
streak. Nothing fires during warm-up, in cooldown after a capture, or beyond the hourly budget (manual
captures count against the budget too).
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from moe_monitor.settings import setting


@dataclass(frozen=True)
class DetectorConfig:
    horizon_windows: int = setting(60, "--baseline-windows", "Windows of history the baselines are taken over.",
                                   minimum=2, group="detector")
    warmup_windows: int = setting(10, "--warmup-windows", "Active windows learned before anything fires.",
                                  minimum=1, group="detector")
    consecutive: int = setting(3, "--consecutive-windows", "Windows in a row over a threshold before a capture.",
                               minimum=1, group="detector")
    step_margin: float = setting(0.30, "--step-margin", "Step-time regression: mean step time above baseline x "
                                 "(1 + margin).", minimum=0.01, group="detector")
    min_steps: int = setting(10, "--min-window-steps", "Timed steps of a (phase, tokens bucket) a window needs to "
                             "count for the step-time detector (its mean step time rests on them; the plugin times "
                             "1 step in MOE_MONITOR_STEP_TIME_EVERY on CUDA).", minimum=1, group="detector")
    imbalance_abs: float = setting(4.0, "--imbalance-threshold", "Worst-layer max/mean that is a regression on "
                                   "its own.", minimum=1, group="detector")
    imbalance_rise: float = setting(1.5, "--imbalance-rise", "... or this multiple of its recent median.",
                                    minimum=1, group="detector")
    cooldown_s: float = setting(600.0, "--capture-cooldown", "Seconds after a capture before the detector may "
                                "fire again.", minimum=0, group="detector")
    max_per_hour: int = setting(4, "--max-captures-per-hour", "Budget of captures per hour, manual ones "
                                "included.", minimum=0, group="detector")
    step_baseline_quantile: float = setting(0.9, "--step-baseline-quantile", "Step-time baseline: this quantile of "
                                            "the recent windows of the same phase and tokens bucket (0.5 = median; "
                                            "0.9 = the slow end of normal).", minimum=0.0, maximum=1.0,
                                            group="detector")

    step_noise_sigmas: float = setting(3.0, "--step-noise-sigmas", "Step-time regression: the mean must also be this "
                                       "many robust standard deviations (1.4826 x MAD of the recent windows of the "
                                       "same key) above their median, so a noisy key needs a larger rise (0 = off).",
                                       minimum=0.0, group="detector")

    def __post_init__(self):
        if not 0.0 <= self.step_baseline_quantile <= 1.0:
            raise ValueError(f"step_baseline_quantile must be in [0, 1], got {self.step_baseline_quantile}")


@dataclass(frozen=True)
class WindowSignals:
    end: float  # unix time of the window's end
    step_means: dict[tuple[str, str], tuple[float, int]]  # (phase, tokens_le) -> (mean seconds, timed steps)
    worst_imbalance: float | None  # worst layer's max/mean, None when the window was too small
    worst_layer: int | None = None


@dataclass(frozen=True)
class Decision:
    reason: str  # step_time | imbalance | manual
    signal: str  # e.g. "step_time{phase=decode,tokens_le=8}" or "worst_layer_imbalance_ratio"
    current: float
    baseline: float | None
    threshold: float
    windows: tuple[float, ...]  # ends of the windows that exceeded
    detail: dict = field(default_factory=dict)

    def evidence(self) -> dict:
        return {"reason": self.reason, "signal": self.signal, "current": self.current, "baseline": self.baseline,
                "threshold": self.threshold, "windows": list(self.windows), **self.detail}


def robust_spread(values) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x the median absolute deviation: sigma for normal data,
    unmoved by the odd outlier window) of a key's recent window means."""
    a = np.asarray(values, dtype=float)
    median = float(np.median(a))
    return median, 1.4826 * float(np.median(np.abs(a - median)))


class Detector:
    def __init__(self, config: DetectorConfig = DetectorConfig()):
        self.config = config
        self.active_windows = 0
        self._step_history: dict[tuple, deque] = defaultdict(lambda: deque(maxlen=config.horizon_windows))
        self._imbalance_history: deque = deque(maxlen=config.horizon_windows)
        self._streaks: dict[str, list[float]] = defaultdict(list)
        self._captures: deque[float] = deque()
        self.last_capture: float | None = None
        # for the detector metrics: (signal, phase, tokens_le) -> value; phase/tokens_le "" for imbalance
        self.baselines: dict[tuple[str, str, str], float] = {}
        self.currents: dict[tuple[str, str, str], float] = {}
        self.thresholds: dict[tuple[str, str, str], float] = {}  # step time: what the last judged window had to exceed

    # -- state ------------------------------------------------------------------------------------
    def state(self, now: float) -> str:
        if self.active_windows < self.config.warmup_windows:
            return "warmup"
        if self.cooling_down(now):
            return "cooldown"
        if self._budget_left(now) <= 0:
            return "budget_exhausted"
        return "armed"

    def _budget_left(self, now: float) -> int:
        while self._captures and now - self._captures[0] > 3600:
            self._captures.popleft()
        return self.config.max_per_hour - len(self._captures)

    def cooling_down(self, now: float) -> bool:
        """Within the cooldown after the last capture (automatic ones wait it out; manual ones do not)."""
        return self.last_capture is not None and now - self.last_capture < self.config.cooldown_s

    def allow_manual(self, now: float) -> bool:
        return self._budget_left(now) > 0

    def record_capture(self, now: float) -> None:
        """A capture was started (automatic or manual): cooldown and budget start counting. The caller
        records it only when a capture really started, so a busy capturer does not burn the budget."""
        self._captures.append(now)
        self.last_capture = now
        self._streaks.clear()

    # -- windows ----------------------------------------------------------------------------------
    def observe(self, w: WindowSignals) -> Decision | None:
        cfg = self.config
        active = bool(w.step_means) or w.worst_imbalance is not None
        if not active:
            return None  # idle: nothing learned, streaks kept
        self.active_windows += 1
        candidates = []
        for key, (mean, steps) in sorted(w.step_means.items()):
            if steps < cfg.min_steps:
                continue
            name = f"step_time{{phase={key[0]},tokens_le={key[1]}}}"
            history = self._step_history[key]
            learned = len(history) >= cfg.warmup_windows
            baseline = float(np.quantile(history, cfg.step_baseline_quantile)) if learned else None
            self.currents[("step_time", *key)] = mean
            if baseline is not None:
                self.baselines[("step_time", *key)] = baseline
                median, sigma = robust_spread(history)
                threshold = max(baseline * (1 + cfg.step_margin), median + cfg.step_noise_sigmas * sigma)
                self.thresholds[("step_time", *key)] = threshold
                if mean > threshold:
                    candidates.append(self._streak("step_time", name, w.end, mean, baseline, threshold,
                                                   {"phase": key[0], "tokens_le": key[1], "timed_steps": steps,
                                                    "baseline_quantile": cfg.step_baseline_quantile,
                                                    "median": median, "robust_sigma": sigma}))
                else:
                    self._streaks.pop(name, None)
                    history.append(mean)
            else:
                history.append(mean)
        if w.worst_imbalance is not None:
            name = "worst_layer_imbalance_ratio"
            history = self._imbalance_history
            baseline = statistics.median(history) if len(history) >= cfg.warmup_windows else None
            self.currents[(name, "", "")] = w.worst_imbalance
            threshold = cfg.imbalance_abs if baseline is None else min(cfg.imbalance_abs, baseline * cfg.imbalance_rise)
            if baseline is not None:
                self.baselines[(name, "", "")] = baseline
            if w.worst_imbalance >= threshold and (baseline is not None or w.worst_imbalance >= cfg.imbalance_abs):
                candidates.append(self._streak("imbalance", name, w.end, w.worst_imbalance, baseline, threshold,
                                               {"layer": w.worst_layer}))
            else:
                self._streaks.pop(name, None)
                history.append(w.worst_imbalance)
        fired = [c for c in candidates if c is not None]
        if not fired or self.state(w.end) != "armed":
            return None
        return max(fired, key=lambda d: d.current / d.threshold)  # the caller records the capture it starts

    def _streak(self, reason, name, end, current, baseline, threshold, detail) -> Decision | None:
        streak = self._streaks[name]
        streak.append(end)
        if len(streak) < self.config.consecutive:
            return None
        return Decision(reason, name, current, baseline, threshold, tuple(streak[-self.config.consecutive:]), detail)
