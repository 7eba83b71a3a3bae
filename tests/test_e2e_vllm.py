"""End to end on real components: vLLM CPU OpenAI server with the plugin installed through its entry point,
the sidecar as a separate process, requests over HTTP, assertions on the sidecar's /metrics.

Tests in this module run in order against one server (counts are cumulative)."""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import free_port, have, samples, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not have("vllm"), reason="needs vLLM")]

from moe_monitor.demo import launch, workload  # noqa: E402
from moe_monitor.plugin import compat  # noqa: E402


@functools.cache
def profile_body() -> bool:
    """Whether /start_profile reads its body (file prefix, max_iterations): from vLLM 0.32 on (docs/install.md);
    scripts/vllm-matrix runs this module against older releases too. vLLM is imported here, not at collection."""
    import vllm

    return compat.parse_version(vllm.__version__) >= (0, 32)


@pytest.fixture(scope="module", params=["eager", "compiled", "sampled"])
def stack(request, tiny_model, tmp_path_factory):
    """eager: --enforce-eager. compiled: vLLM's default torch.compile on CPU, the tap traced into the graph
    (the compile cache key does not see the plugin, so the cache is off, as docs/install.md says). sampled: eager,
    with the step timer on a pseudo-random 1 in 2 steps (MOE_MONITOR_STEP_TIME_EVERY; on CUDA 1 in 16 is the
    default): every count stays exact."""
    model_dir, meta = tiny_model
    work = tmp_path_factory.mktemp(f"stack-{request.param}")
    segments = str(work / "segments")
    env = launch.vllm_env(segments, publish_interval=0.2)
    profiles = str(work / "profiles")
    profiler = {"profiler": "torch", "torch_profiler_dir": profiles, "torch_profiler_with_stack": False}
    if not profile_body():  # vLLM < 0.32 ignores /start_profile's body: the profile's length goes in the config
        profiler["max_iterations"] = 4
    args = ["--profiler-config", json.dumps(profiler)] + (["--enforce-eager"] if request.param != "compiled" else [])
    if request.param == "sampled":
        env["MOE_MONITOR_STEP_TIME_EVERY"] = "2"
    if request.param == "compiled":
        env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    server = launch.start_vllm(model_dir, free_port(), str(work / "vllm.log"), env, args)
    sidecar = launch.start_sidecar(segments, free_port(), str(work / "sidecar.log"),
                                   ["--window", "1", "--expert-series", "all", "--min-window-assignments", "20",
                                    "--profile-dir", profiles])
    try:
        server.wait_ready("/health", 300)
        sidecar.wait_ready("/healthz", 30)
        yield server, sidecar, meta, request.param
    finally:
        sidecar.stop()
        server.stop()


def routed(metrics) -> np.ndarray:
    """moe_expert_routed_tokens_total as an array [layer, expert]."""
    s = samples(metrics, "moe_expert_routed_tokens_total")
    layers = sorted({int(dict(k)["layer"]) for k in s})
    experts = sorted({int(dict(k)["expert"]) for k in s})
    out = np.zeros((len(layers), len(experts)), dtype=np.int64)
    for labels, v in s.items():
        d = dict(labels)
        out[layers.index(int(d["layer"])), int(d["expert"])] = int(v)
    return out


def settled(url: str, expect_total: int, timeout: float = 10.0) -> dict:
    """Scrape until the per-layer totals reach what was sent (the plugin publishes every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if routed(m).sum(axis=1).min() >= expect_total or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_counts_are_zero_before_the_first_request(stack):
    _, sidecar, meta, _ = stack
    m = scrape(sidecar.url + "/metrics")
    counts = routed(m)
    assert counts.shape == (meta["num_layers"], meta["num_experts"])
    assert counts.sum() == 0, "warm-up / profiling dummy runs must not be counted"
    assert samples(m, "moe_monitor_segment_up") == {(("segment", "dp0-pp0-tp0"),): 1.0}
    assert samples(m, "moe_monitor_unobservable_layers") == {(): 0.0}


def test_counts_match_computed_tokens_and_transformers_replay(stack, tiny_model):
    server, sidecar, meta, scenario = stack
    texts = workload.prompts(12, seed=1)
    done = workload.run(server.url, texts, max_tokens=6, concurrency=4)
    sequences = [c.computed_token_ids for c in done]
    computed = sum(len(s) for s in sequences)
    m = settled(sidecar.url + "/metrics", computed * meta["top_k"])
    counts = routed(m)
    assert (counts.sum(axis=1) == computed * meta["top_k"]).all(), (counts.sum(axis=1), computed)

    from moe_monitor.demo.tiny_model import replay_routing

    reference = replay_routing(tiny_model[0], sequences)
    np.testing.assert_array_equal(counts, reference)
    assert sum(samples(m, "moe_step_tokens_total").values()) == computed
    steps = sum(v for k, v in samples(m, "moe_steps_total").items())
    assert steps >= max(len(c.output_token_ids) for c in done)  # one step per generated token, at least
    timed = {dict(k)["phase"] + "/" + dict(k)["tokens_le"]: v
             for k, v in samples(m, "moe_step_duration_seconds_count").items()}
    every = {dict(k)["phase"] + "/" + dict(k)["tokens_le"]: v for k, v in samples(m, "moe_steps_total").items()}
    assert all(every.get(k, 0) >= v for k, v in timed.items()), (every, timed)
    if scenario == "sampled":  # about half the steps timed: P(none or all of 20+ steps) < 1e-6
        assert 0 < sum(timed.values()) < steps, (every, timed)
    else:  # on CPU the plugin times every step (the last one may still be waiting for its time)
        assert steps - sum(timed.values()) <= 1, (every, timed)


def test_hot_expert_prompts_make_the_configured_expert_top(stack):
    server, sidecar, meta, _ = stack
    before = routed(scrape(sidecar.url + "/metrics"))
    done = workload.run(server.url, workload.prompts(8, meta["hot_words"], hot_share=0.6, seed=2), max_tokens=4)
    computed = sum(len(c.computed_token_ids) for c in done)
    after = routed(settled(sidecar.url + "/metrics", before.sum(axis=1).min() + computed * meta["top_k"]))
    delta = after - before
    assert (delta.sum(axis=1) == computed * meta["top_k"]).all()
    assert (delta.argmax(axis=1) == meta["hot_expert"]).all(), delta


def window_figures_while(sidecar_url: str, work, window_s: float = 1.0) -> list[dict]:
    """Run `work` in a thread; collect the per-layer figures of every window closed inside its run."""
    done = threading.Event()
    began = time.time()
    thread = threading.Thread(target=lambda: (work(), done.set()), daemon=True)
    thread.start()
    windows, finished = {}, None
    while finished is None or max(windows, default=0) < finished + window_s:
        if finished is None and done.is_set():
            finished = time.time()
        m = scrape(sidecar_url + "/metrics")
        end = samples(m, "moe_window_end_timestamp_seconds").get(())
        if end is not None and end - window_s >= began:
            windows[end] = {name: {int(dict(k)["layer"]): v for k, v in samples(m, name).items()}
                            for name in ("moe_layer_imbalance_ratio", "moe_layer_top1_share")}
        time.sleep(0.2)
    thread.join()
    return [w for end, w in windows.items() if end <= finished + window_s
            and not any(np.isnan(v) for v in w["moe_layer_top1_share"].values())]


def test_hot_prompts_move_imbalance_and_balanced_traffic_brings_it_back(stack):
    server, sidecar, meta, _ = stack

    def phase(hot: bool, seed: int):
        def work():  # at least 4 s of traffic: several closed 1 s windows
            deadline, i = time.monotonic() + 4, 0
            while time.monotonic() < deadline:
                texts = workload.prompts(8, meta["hot_words"] if hot else (), hot_share=0.9, seed=seed + i,
                                         words_per_prompt=(30, 60))
                workload.run(server.url, texts, max_tokens=2)
                i += 1
        return window_figures_while(sidecar.url, work)

    def median(windows, name, layer):
        return float(np.median([w[name][layer] for w in windows]))

    balanced, hot, back = phase(False, 100), phase(True, 200), phase(False, 300)
    assert len(balanced) >= 2 and len(hot) >= 2 and len(back) >= 2, (len(balanced), len(hot), len(back))
    for layer in range(meta["num_layers"]):
        b, h, r = (median(w, "moe_layer_top1_share", layer) for w in (balanced, hot, back))
        assert h > b + 0.1 and h > r + 0.1, ("top1 share", layer, b, h, r)
        b, h, r = (median(w, "moe_layer_imbalance_ratio", layer) for w in (balanced, hot, back))
        assert h > 1.3 * b and h > 1.3 * r, ("imbalance ratio", layer, b, h, r)


def test_profiler_capture_breakdown_reaches_the_sidecar(stack):
    """POST /start_profile on vLLM → rank traces in the profiler dir → the sidecar's moe_capture_* gauges."""
    server, sidecar, _, _ = stack
    body = json.dumps({"profile_prefix": "e2e_", "max_iterations": 4}).encode()
    req = urllib.request.Request(server.url + "/start_profile", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(req, timeout=60).status == 200
    workload.run(server.url, workload.prompts(4, seed=7), max_tokens=4)
    if not profile_body():  # and before 0.32 the profile may run until it is stopped (the sidecar's capturer does it)
        stop = urllib.request.Request(server.url + "/stop_profile", data=b"", method="POST")
        assert urllib.request.urlopen(stop, timeout=120).status == 200
    deadline, m = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        m = scrape(sidecar.url + "/metrics")
        if samples(m, "moe_capture_info"):
            break
        time.sleep(1)
    name = "e2e" if profile_body() else "unnamed"  # the sidecar's name for a capture whose files have no prefix
    assert samples(m, "moe_capture_info") == {(("capture", name), ("ranks", "1")): 1.0}
    shares = {dict(k)["category"]: v for k, v in samples(m, "moe_capture_share").items()}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["experts"] > 0 and shares["gate"] > 0 and shares["attention"] > 0


def test_sidecar_reports_steps_by_phase(stack):
    _, sidecar, _, _ = stack
    m = scrape(sidecar.url + "/metrics")
    phases = {dict(k)["phase"] for k, v in samples(m, "moe_step_duration_seconds_count").items() if v > 0}
    assert {"prefill", "decode"} <= phases


def test_vllm_keeps_serving_when_the_segment_directory_is_unwritable(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    blocker = tmp_path / "segments-volume"
    blocker.write_text("a regular file where the segment directory should be: every publish fails")
    env = launch.vllm_env(str(blocker / "moe"), publish_interval=0.2)
    server = launch.start_vllm(model_dir, free_port(), str(tmp_path / "vllm.log"), env, ["--enforce-eager"])
    try:
        server.wait_ready("/health", 300)
        done = workload.run(server.url, workload.prompts(4, seed=3), max_tokens=3)
        assert [len(c.output_token_ids) for c in done] == [3, 4, 5, 6]
        time.sleep(0.5)
        log = server.log_tail(400)
        assert log.count("moe-monitor cannot publish") == 1, "logged once, not at every retry"
        assert "Traceback" not in log
    finally:
        server.stop()
