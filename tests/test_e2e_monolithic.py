"""Layers whose experts kernel routes inside the kernel (issue #17 part 4), on real vLLM CPU servers.

A test-only vLLM plugin (tests/fixtures/monolithic_plugin) swaps vLLM's MoE experts for a monolithic
kernel that gets the router logits, routes itself (vLLM's router never runs) and writes the ids it chose
into vLLM's routed-experts sink when the kernel says it supports that. Two servers, each with its sidecar:

- `own_sink`: layer 0's kernel does not report its routing, layer 1's does; nothing else asks vLLM for
  routed experts, so moe-monitor creates layer 1's sink itself. Layer 0 must be reported unobservable, layer
  1 counted exactly.
- `shared_sink`: every layer reports, and a second user of the sinks binds through vLLM's own
  `bind_routed_experts_capturer` after moe-monitor attached, as `--enable-return-routed-experts` does (that
  flag needs vLLM's GPU model runner V2, so the test plugin binds a capturer of its own): vLLM gives every
  layer a new sink, and both users must still get every id.

Reference for both: the transformers replay of the computed tokens (the kernel computes the model's real
MoE, so generation and routing equal the other e2e tests'), and for `shared_sink` the other user's counts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, have, samples, scrape

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not have("vllm"), reason="needs vLLM")]

from moe_monitor.demo import launch, workload  # noqa: E402
from moe_monitor.demo.tiny_model import replay_routing  # noqa: E402

PLUGIN_DIR = Path(__file__).parent / "fixtures" / "monolithic_plugin"


@pytest.fixture(scope="module", autouse=True)
def routed_experts_sinks():
    """Skips the module on a vLLM without routed-experts sinks (before 0.32; 0.27-0.31 have the module, not the
    sinks: scripts/vllm-matrix). Checked when a test runs, so collecting the module does not import vLLM."""
    sinks = pytest.importorskip("vllm.model_executor.layers.fused_moe.routed_experts_capturer")
    if not hasattr(sinks, "RoutedExpertsSink"):
        pytest.skip("this vLLM has no routed-experts sinks (>= 0.32)")


def start(name: str, model_dir: str, work: Path, silent_layers: str, extra_env: dict[str, str]):
    segments = str(work / name / "segments")
    env = launch.vllm_env(segments, publish_interval=0.2)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), env.get("PYTHONPATH", "")) if p)
    env["MOE_TEST_MONOLITHIC_SILENT_LAYERS"] = silent_layers
    env.update(extra_env)
    server = launch.start_vllm(model_dir, free_port(), str(work / f"{name}-vllm.log"), env, ["--enforce-eager"])
    sidecar = launch.start_sidecar(segments, free_port(), str(work / f"{name}-sidecar.log"),
                                   ["--window", "1", "--expert-series", "all"])
    return server, sidecar


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    model_dir, meta = tiny_model
    work = tmp_path_factory.mktemp("monolithic")
    procs = {"own_sink": start("own_sink", model_dir, work, "0", {}),
             "shared_sink": start("shared_sink", model_dir, work, "",
                                  {"MOE_TEST_MONOLITHIC_CAPTURE_FILE": str(work / "theirs.npy")})}
    try:
        for server, sidecar in procs.values():
            server.wait_ready("/health", 300)
            sidecar.wait_ready("/healthz", 30)
        yield procs, meta, work
    finally:
        for server, sidecar in procs.values():
            sidecar.stop()
            server.stop()


def routed(metrics: dict, num_layers: int, num_experts: int) -> np.ndarray:
    out = np.zeros((num_layers, num_experts), dtype=np.int64)
    for labels, v in samples(metrics, "moe_expert_routed_tokens_total").items():
        d = dict(labels)
        out[int(d["layer"]), int(d["expert"])] = int(v)
    return out


def settled(url: str, meta: dict, layer: int, expect: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if routed(m, meta["num_layers"], meta["num_experts"])[layer].sum() >= expect or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_the_monolithic_kernel_really_replaced_vllms_experts(servers):
    procs, _, _ = servers
    for server, _ in procs.values():
        log = server.log_tail(2000)
        assert "Using TopKMonolithicExperts MoE backend" in log, log[-3000:]


def test_a_layer_whose_kernel_reports_is_counted_exactly_and_the_other_is_unobservable(servers, tiny_model):
    procs, meta, _ = servers
    server, sidecar = procs["own_sink"]
    texts = workload.prompts(10, seed=11)
    done = workload.run(server.url, texts, max_tokens=5, concurrency=4)
    sequences = [c.computed_token_ids for c in done]
    computed = sum(len(s) for s in sequences)
    m = settled(sidecar.url + "/metrics", meta, 1, computed * meta["top_k"])
    counts = routed(m, meta["num_layers"], meta["num_experts"])
    reference = replay_routing(tiny_model[0], sequences)
    np.testing.assert_array_equal(counts[1], reference[1])
    assert counts[1].sum() == computed * meta["top_k"]
    assert counts[0].sum() == 0
    assert samples(m, "moe_monitor_unobservable_layers") == {(): 1.0}
    log = server.log_tail(2000)
    assert "cannot observe MoE layer 0" in log and "does not report its routing" in log
    assert "(1 through the kernel's routed-experts sink), 1 unobservable" in log


def test_moe_monitor_and_another_user_of_the_sink_both_get_every_id(servers, tiny_model):
    """The other user bound after moe-monitor (vLLM replaced the sinks): moe-monitor re-tapped them."""
    procs, meta, work = servers
    server, sidecar = procs["shared_sink"]
    url = sidecar.url + "/metrics"
    before, theirs_before = routed(scrape(url), meta["num_layers"], meta["num_experts"]), np.load(work / "theirs.npy")
    assert before.sum() == 0, "warm-up and profiling runs are not counted"
    done = workload.run(server.url, workload.prompts(10, seed=12), max_tokens=5, concurrency=4)
    sequences = [c.computed_token_ids for c in done]
    computed = sum(len(s) for s in sequences)
    m = settled(url, meta, meta["num_layers"] - 1, computed * meta["top_k"])
    counts = routed(m, meta["num_layers"], meta["num_experts"])
    theirs = np.load(work / "theirs.npy") - theirs_before  # theirs counts warm-up too: compare the delta
    np.testing.assert_array_equal(counts, replay_routing(tiny_model[0], sequences))
    np.testing.assert_array_equal(counts, theirs)
    assert (counts.sum(axis=1) == computed * meta["top_k"]).all()
    assert samples(m, "moe_monitor_unobservable_layers") == {(): 0.0}
    assert f"({meta['num_layers']} through the kernel's routed-experts sink), 0 unobservable" in server.log_tail(2000)
