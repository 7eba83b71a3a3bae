"""The regression detector on synthetic window sequences."""

from __future__ import annotations

import random

import pytest

from moe_monitor.detect.detector import Detector, DetectorConfig, WindowSignals

CFG = DetectorConfig(horizon_windows=30, warmup_windows=5, consecutive=3, step_margin=0.3, min_steps=10,
                     imbalance_abs=4.0, imbalance_rise=1.5, cooldown_s=100, max_per_hour=2)


def window(t, decode=0.020, prefill=None, steps=50, imbalance=1.3):
    means = {("decode", "8"): (decode, steps)}
    if prefill is not None:
        means[("prefill", "512")] = (prefill, steps)
    return WindowSignals(float(t), means, imbalance, 3)


def run(detector, windows):
    """Feed windows; every decision starts a capture (as the sidecar does when its capturer is free)."""
    fired = []
    for w in windows:
        d = detector.observe(w)
        if d is not None:
            detector.record_capture(w.end)
            fired.append((w.end, d))
    return fired


def test_a_decision_that_starts_no_capture_burns_no_budget():
    d = Detector(CFG)
    for t in range(10):
        d.observe(window(t, imbalance=1.5))
    busy = [d.observe(window(10 + t, imbalance=9.0)) for t in range(6)]  # capturer busy: nothing recorded
    assert sum(x is not None for x in busy) == 4 and d.state(16) == "armed"


def test_step_change_fires_after_consecutive_windows_with_evidence():
    d = Detector(CFG)
    fired = run(d, [window(t) for t in range(10)] + [window(10 + t, decode=0.030) for t in range(5)])
    assert [t for t, _ in fired] == [12.0]  # third regressed window; then cooldown
    decision = fired[0][1]
    assert decision.reason == "step_time" and decision.signal == "step_time{phase=decode,tokens_le=8}"
    assert decision.baseline == 0.020 and decision.current == 0.030 and decision.windows == (10.0, 11.0, 12.0)
    assert decision.evidence()["phase"] == "decode"


def test_noise_and_slow_drift_do_not_fire():
    rng = random.Random(0)
    d = Detector(CFG)
    noisy = [window(t, decode=0.020 * rng.uniform(0.9, 1.1)) for t in range(100)]
    drift = [window(100 + t, decode=0.020 * 1.01 ** t) for t in range(100)]  # +1 %/window, ~2.7x overall
    assert run(d, noisy + drift) == []


def test_return_to_normal_after_a_fast_spell_is_not_a_regression():
    """Measured on the 2-vCPU CI host: every key ran 20-30 % faster for ~17 windows, then returned. Against the
    median of a history dominated by the fast spell the return reads as +38 %; against p90 (the default) it
    does not, and the same return does fire when the baseline is the median (and the margin the only bar)."""
    rng = random.Random(1)
    normal = [window(t, decode=0.020 * rng.uniform(0.95, 1.05)) for t in range(10)]
    fast = [window(10 + t, decode=0.0145 * rng.uniform(0.95, 1.05)) for t in range(15)]
    back = [window(25 + t, decode=0.020 * rng.uniform(0.97, 1.03)) for t in range(10)]
    assert run(Detector(CFG), normal + fast + back) == []
    median = DetectorConfig(**{**CFG.__dict__, "step_baseline_quantile": 0.5, "step_noise_sigmas": 0.0})
    fired = run(Detector(median), normal + fast + back)
    assert len(fired) == 1 and fired[0][0] >= 27.0 and fired[0][1].baseline < 0.016


def test_a_real_step_change_clears_the_p90_baseline_of_a_noisy_history():
    rng = random.Random(2)
    noisy = [window(t, decode=0.020 * rng.uniform(0.85, 1.15)) for t in range(30)]
    slow = [window(30 + t, decode=0.020 * 1.6 * rng.uniform(0.95, 1.05)) for t in range(3)]
    fired = run(Detector(CFG), noisy + slow)
    assert [t for t, _ in fired] == [32.0]
    assert 0.020 * 1.05 < fired[0][1].baseline < 0.020 * 1.15  # p90 of the noise, above its median


# decode <= 1 token on vLLM CPU, 5 s windows, the shipped defaults, while other jobs shared the 2-core VM
# (benchmarks/results/steady_windows_cpu_3.json, the first 20 windows; ms): a fast spell, then normal speed,
# then three windows of a slower spell. The key's windows wander -30..+33 % around their median of 3.6 ms.
WANDERING = [4.85, 4.00, 2.67, 2.81, 3.60, 2.80, 2.51, 2.91, 2.97, 3.32, 3.22, 3.74, 4.42, 3.72, 4.31, 4.71, 4.17]
SLOW_SPELL = [6.03, 5.93, 6.96]  # +64..93 % over the median, +31..54 % over p90: what the old rule captured


def wandering(t, ms, steps=15):
    return WindowSignals(float(t), {("decode", "1"): (ms / 1000, steps)}, None)


def test_a_key_whose_windows_wander_needs_a_rise_beyond_its_own_spread():
    """The false capture of a clean-clone CI run (decode <= 8 tokens at 5.89 ms against a p90 of 4.38 ms, +35 %,
    three windows in a row), reproduced on the same VM: against p90 x 1.3 alone the slow spell fires; the
    shipped rule also asks for the median + 3 robust sigma of the key's windows (6.65 ms here), and it does not."""
    cfg = DetectorConfig()
    steady = [wandering(5 * i, ms) for i, ms in enumerate(WANDERING + SLOW_SPELL)]
    old = run(Detector(DetectorConfig(**{**cfg.__dict__, "step_noise_sigmas": 0.0})), steady)
    assert [t for t, _ in old] == [95.0] and old[0][1].baseline < 0.0046  # the old rule: a false capture
    assert run(Detector(cfg), steady) == []


def test_a_sustained_doubling_of_a_wandering_key_is_caught_in_three_windows():
    cfg = DetectorConfig()
    history = [wandering(5 * i, ms) for i, ms in enumerate(WANDERING)]
    doubled = [wandering(5 * (len(WANDERING) + i), 2 * 3.6 * f) for i, f in enumerate([1.0, 0.97, 1.03, 1.0])]
    fired = run(Detector(cfg), history + doubled)
    assert [t for t, _ in fired] == [5.0 * (len(WANDERING) + 2)]  # the third doubled window
    evidence = fired[0][1].evidence()
    assert evidence["current"] > evidence["threshold"] > evidence["median"] + 3 * evidence["robust_sigma"] - 1e-12
    assert evidence["threshold"] > evidence["baseline"] * (1 + cfg.step_margin)  # the spread set the bar here


def test_noise_sigmas_off_is_the_p90_margin_alone():
    d = Detector(DetectorConfig(**{**CFG.__dict__, "step_noise_sigmas": 0.0}))
    fired = run(d, [window(t) for t in range(10)] + [window(10 + t, decode=0.0261) for t in range(3)])
    assert [t for t, _ in fired] == [12.0] and fired[0][1].threshold == pytest.approx(0.020 * 1.3)


def test_baseline_quantile_is_validated():
    with pytest.raises(ValueError, match="step_baseline_quantile"):
        DetectorConfig(step_baseline_quantile=1.5)


def test_batch_mix_shift_is_not_a_regression():
    d = Detector(CFG)
    decode_only = [window(t) for t in range(10)]
    mixed = [window(10 + t, prefill=0.200) for t in range(20)]  # slow prefill steps appear: another key
    assert run(d, decode_only + mixed) == []


def test_too_few_steps_and_idle_windows_neither_count_nor_break():
    d = Detector(CFG)
    base = [window(t) for t in range(10)]
    seq = [window(10, decode=0.03), WindowSignals(11.0, {}, None), window(12, decode=0.03, steps=3),
           window(13, decode=0.03), window(14, decode=0.03)]
    fired = run(d, base + seq)
    assert [t for t, _ in fired] == [14.0]  # windows 10, 13, 14 (idle and 3-step windows skipped)


def test_imbalance_absolute_and_relative():
    d = Detector(CFG)
    fired = run(d, [window(t, imbalance=1.5) for t in range(10)] + [window(10 + t, imbalance=2.4) for t in range(3)])
    assert fired and fired[0][1].reason == "imbalance" and fired[0][1].threshold == 1.5 * 1.5
    assert fired[0][1].detail["layer"] == 3


def test_warmup_cooldown_and_hourly_budget():
    d = Detector(CFG)
    assert run(d, [window(t, imbalance=9.0) for t in range(4)]) == []  # warm-up: the streak builds, no capture
    assert d.state(4) == "warmup"
    bad = [window(t, imbalance=9.0) for t in range(4, 1000, 10)]
    fired = [t for t, _ in run(d, bad)]
    assert fired[:2] == [4.0, 104.0]  # first armed window; then 100 s of cooldown
    assert len(fired) == 2 and d.state(500) == "budget_exhausted"  # 2 per hour
    assert not d.allow_manual(500)
    assert d.state(24 + 3601) in ("armed", "cooldown")


def _replay_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "detector_replay.py"
    spec = importlib.util.spec_from_file_location("detector_replay", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, sorted(path.parent.glob("results/steady_windows_cpu_*.json"))


def test_recorded_steady_traffic_replays_without_a_capture():
    """Windows recorded from a real vLLM CPU server under the steady mix (benchmarks/detector_replay.py): the
    shipped defaults take no capture on any of them; the old rule (p90 x 1.3 alone) took one on the recording
    made while other jobs shared the VM; the p90 baseline leaves more headroom than the median."""
    import json

    replay, recordings = _replay_module()
    assert len(recordings) >= 3
    old = DetectorConfig(step_noise_sigmas=0.0)
    old_fired = 0
    for path in recordings:
        windows = json.loads(path.read_text())["windows"]
        assert len(windows) >= 60
        fired, worst = replay.replay_one(windows, DetectorConfig())
        assert fired == 0 and worst < 1.0, path.name
        fired_p90, worst_p90 = replay.replay_one(windows, old)
        old_fired += fired_p90
        _, worst_median = replay.replay_one(windows, DetectorConfig(step_noise_sigmas=0.0, step_baseline_quantile=0.5))
        assert worst_p90 < worst_median
    assert old_fired >= 1


def test_a_doubling_injected_into_the_recorded_traffic_is_caught():
    """Every key x2 from onsets every 5 windows of each recording: the shipped rule catches every one, in at most
    30 s (6 windows), as the old rule did."""
    import json

    replay, recordings = _replay_module()
    for path in recordings:
        windows = json.loads(path.read_text())["windows"]
        for rule in (DetectorConfig(), DetectorConfig(step_noise_sigmas=0.0)):
            delays = replay.detection_delays(windows, rule, 2.0)
            assert delays and all(d is not None and d <= 6 for d in delays), (path.name, delays)
