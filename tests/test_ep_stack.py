"""A two-rank expert-parallel MoE stack (benchmarks/ep_stack.py: gloo on CPU here, NCCL on GPUs) → the plugin's
recorder and segment writer on each rank → the real sidecar CLI on both segments → /metrics. The per-EP-rank
load and the rank imbalance must equal what each rank RECEIVED in the dispatch all-to-all (counted by the
stack from the expert ids that arrived, independently of the recorder), and the profiler traces of both ranks
must show the all-to-all and the experts in their rows of the breakdown.

EP_STACK_RUN=DIR runs the same checks on the output of an earlier run instead (the GPU run's $OUT, copied
back): `EP_STACK_RUN=/path/to/out .venv/bin/python -m pytest -q tests/test_ep_stack.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import free_port, samples, scrape

from moe_monitor.breakdown.analyze import analyze
from moe_monitor.breakdown.trace import read_trace
from moe_monitor.channel import read_segment
from moe_monitor.demo import launch

pytestmark = pytest.mark.slow  # runs benchmarks/ep_stack.py (4 ranks) and a sidecar once: ~10 s

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "ep_stack.py")
LAYERS, EXPERTS, TOP_K, TOKENS, STEPS, HOT = 3, 8, 2, 48, 4, 5
PROFILE_STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(output dir, ground truth, stdout) of one run of the stack."""
    if os.environ.get("EP_STACK_RUN"):
        out = os.environ["EP_STACK_RUN"]
        with open(os.path.join(out, "ground_truth.json")) as f:
            return out, json.load(f), ""
    out = str(tmp_path_factory.mktemp("ep"))
    cmd = [sys.executable, SCRIPT, "--backend", "gloo", "--device", "cpu", "--layers", str(LAYERS),
           "--experts", str(EXPERTS), "--top-k", str(TOP_K), "--hidden", "32", "--tokens", str(TOKENS),
           "--steps", str(STEPS), "--hot-expert", str(HOT), "--out", out, "--profile",
           "--profile-steps", str(PROFILE_STEPS), "--timeout", "120"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(out, "ground_truth.json")) as f:
        return out, json.load(f), p.stdout


def received_by_rank(doc, key):  # [L, W] assignments each rank received in the dispatch all-to-all
    return np.stack([np.asarray(r[key]["received"]).sum(axis=1) for r in doc["ranks"]], axis=1)


def received_by_expert(doc, key):  # [L, E] per global expert id (rank r owns the r-th contiguous block)
    return np.concatenate([np.asarray(r[key]["received"]) for r in doc["ranks"]], axis=1)


def test_ground_truth_is_consistent(run):
    _, doc, stdout = run
    world = doc["run"]["world_size"]
    assert world == len(doc["ranks"]) >= 2
    assert doc["run"]["nvls_env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                      "NVSHMEM_DISABLE_NVLS": "1"}
    a = doc["run"]["args"]
    for key in ("mid", "final"):
        steps = doc["ranks"][0][key]["steps"]
        sent = sum(np.asarray(r[key]["sent"]) for r in doc["ranks"])  # [L, E] what the routers chose
        # Every assignment routed anywhere arrived exactly once at the rank owning its expert.
        assert np.array_equal(received_by_expert(doc, key), sent)
        assert (received_by_rank(doc, key).sum(axis=1) == world * a["tokens"] * a["top_k"] * steps).all()
    if stdout:  # the script's own check (sidecar reader + placement code) passed and said so
        assert stdout.count("== assignments received in the all-to-all") == 2, stdout


def test_each_rank_wrote_a_segment_as_an_ep_rank(run):
    """Ranks as vLLM reports DP=W x TP=1 with EP: distinct DP ranks (summed by the sidecar), ep_rank = dp_rank;
    each segment holds what that rank's router chose (warm-up excluded)."""
    out, doc, _ = run
    world = doc["run"]["world_size"]
    for key, folder in (("mid", "segments_mid"), ("final", "segments")):
        for r in doc["ranks"]:
            snap = read_segment(os.path.join(out, folder, r["segment"]))
            ranks = snap.header.ranks
            assert (ranks.dp_rank, ranks.ep_rank, ranks.tp_rank, ranks.pp_rank) == (r["rank"], r["rank"], 0, 0)
            assert (ranks.dp_size, ranks.ep_size, ranks.tp_size) == (world, world, 1)
            assert np.array_equal(snap.counts, np.asarray(r[key]["sent"]))
            assert snap.header.top_k == doc["run"]["args"]["top_k"]


def _replace_segments(src: str, dst: str) -> None:
    for name in sorted(os.listdir(src)):
        tmp = os.path.join(dst, name + ".tmp")  # not *.moeseg: the sidecar does not list it
        shutil.copyfile(os.path.join(src, name), tmp)
        os.replace(tmp, os.path.join(dst, name))


@pytest.fixture(scope="module")
def metrics(run, tmp_path_factory):
    """The sidecar's /metrics for the window from the mid snapshot to the final one.

    The sidecar starts on the mid segments. Once it has closed a window on them (so its baseline is the mid
    snapshot), the final segments replace them right after the next window boundary, and the window after
    that holds exactly the steps between the two snapshots."""
    out, _, _ = run
    work = tmp_path_factory.mktemp("sidecar")
    segments = str(work / "segments")
    os.makedirs(segments)
    _replace_segments(os.path.join(out, "segments_mid"), segments)
    sidecar = launch.start_sidecar(segments, free_port(), str(work / "sidecar.log"),
                                   ["--window", "1", "--expert-series", "all", "--stale-after", "86400"])
    try:
        sidecar.wait_ready("/healthz", 30)
        url = sidecar.url + "/metrics"
        deadline = time.monotonic() + 30

        def window_end(m):
            return samples(m, "moe_window_end_timestamp_seconds").get(())

        seen = None
        while True:  # a closed window on the mid segments, then the next boundary
            m = scrape(url)
            if window_end(m) is not None and seen is not None and window_end(m) != seen:
                break
            seen = window_end(m)
            assert time.monotonic() < deadline, sidecar.log_tail()
            time.sleep(0.05)
        assert samples(m, "moe_window_routed_tokens")[()] == 0  # the mid segments were the baseline
        _replace_segments(os.path.join(out, "segments"), segments)
        while True:
            m = scrape(url)
            if samples(m, "moe_window_routed_tokens").get((), 0) > 0:
                return m
            assert time.monotonic() < deadline, sidecar.log_tail()
            time.sleep(0.05)
    finally:
        sidecar.stop()


def by_layer_rank(m, name):
    out = {}
    for labels, v in samples(m, name).items():
        d = dict(labels)
        out[(int(d["layer"]), int(d["ep_rank"]))] = v
    return out


def test_sidecar_rank_load_is_what_each_rank_received(run, metrics):
    _, doc, _ = run
    truth = received_by_rank(doc, "final")
    L, W = truth.shape
    exported = by_layer_rank(metrics, "moe_ep_rank_routed_tokens_total")
    assert exported == {(layer, r): float(truth[layer, r]) for layer in range(L) for r in range(W)}
    expert = {(int(dict(k)["layer"]), int(dict(k)["expert"])): v
              for k, v in samples(metrics, "moe_expert_routed_tokens_total").items()}
    per_expert = received_by_expert(doc, "final")
    assert expert == {(layer, e): float(per_expert[layer, e]) for layer in range(L) for e in range(per_expert.shape[1])}
    info = samples(metrics, "moe_monitor_rank_info")
    assert {(dict(k)["segment"], dict(k)["ep_rank"], dict(k)["counted"]) for k in info} == {
        (f"dp{r}-pp0-tp0", str(r), "true") for r in range(W)}


def test_sidecar_rank_imbalance_is_the_received_windows(run, metrics):
    _, doc, _ = run
    window = received_by_rank(doc, "final") - received_by_rank(doc, "mid")  # [L, W]
    ratio = {int(dict(k)["layer"]): v for k, v in samples(metrics, "moe_layer_ep_rank_imbalance_ratio").items()}
    expected = window.max(axis=1) / window.mean(axis=1)
    assert ratio == {layer: pytest.approx(expected[layer], rel=1e-12) for layer in range(len(expected))}
    tokens = {int(dict(k)["layer"]): v for k, v in samples(metrics, "moe_layer_window_routed_tokens").items()}
    assert tokens == {layer: float(window[layer].sum()) for layer in range(len(expected))}
    vllm = samples(metrics, "moe_eplb_balancedness_vllm")[()]
    assert vllm == pytest.approx(window.mean(axis=1).sum() / window.max(axis=1).sum(), rel=1e-12)


def test_hot_expert_loads_its_owner_rank(run, metrics):
    _, doc, _ = run
    hot = doc["run"]["args"]["hot_expert"]
    if hot is None:
        pytest.skip("run without --hot-expert")
    W, E = doc["run"]["world_size"], doc["run"]["args"]["experts"]
    owner = hot // (E // W)
    exported = by_layer_rank(metrics, "moe_ep_rank_routed_tokens_total")
    for layer in range(doc["run"]["args"]["layers"]):
        loads = [exported[(layer, r)] for r in range(W)]
        assert int(np.argmax(loads)) == owner, (layer, loads)
    ratios = samples(metrics, "moe_layer_ep_rank_imbalance_ratio").values()
    assert min(ratios) > 1.1, ratios


def traces(out):
    folder = os.path.join(out, "traces")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)) if os.path.isdir(folder) else []


def test_breakdown_of_both_ranks(run):
    out, doc, _ = run
    a = doc["run"]["args"]
    paths = traces(out)
    assert len(paths) == doc["run"]["world_size"], paths
    for path in paths:
        r = analyze([read_trace(path)], top=10_000)
        cats = r.categories
        assert cats["all_to_all"].us > 0 and cats["experts"].us > 0, cats
        rows = {row.name: vars(row) for row in r.top}
        # Every communication kernel / op of the recorded steps is EP dispatch or combine (no barrier in them).
        comm = [n for n in rows if re.search(r"nccl|alltoall|all_to_all|sendrecv", n, re.IGNORECASE)]
        assert comm and all(rows[n]["category"] == "all_to_all" for n in comm), {n: rows[n]["category"] for n in comm}
        assert len(r.steps) == a["profile_steps"]
        if r.ranks[0].kind == "cpu":
            calls = 4 * a["layers"] * a["profile_steps"]  # split sizes, hidden states, expert ids, combine
            assert rows["c10d::alltoall_base_"]["count"] == rows["gloo:all_to_all"]["count"] == calls
            assert rows["aten::_grouped_mm"]["category"] == rows["aten::mm"]["category"] == "experts"
        else:
            assert sum(rows[n]["count"] for n in comm) >= 3 * a["layers"] * a["profile_steps"], comm
            grouped = [n for n in rows if "GroupProblemShape" in n]
            assert grouped and all(rows[n]["category"] == "experts" for n in grouped)
            assert sum(rows[n]["count"] for n in grouped) == 2 * a["layers"] * a["profile_steps"]


def test_cli_analyze_both_ranks(run):
    out, _, _ = run
    doc = json.loads(subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", "--json", *traces(out)],
                                    capture_output=True, text=True, timeout=120, check=True).stdout)
    assert sorted(r["rank"] for r in doc["ranks"]) == [f"dp{r}-pp0-tp0-ep{r}" for r in range(len(doc["ranks"]))]
    assert doc["categories"]["all_to_all"]["us"] > 0 and doc["categories"]["experts"]["us"] > 0
