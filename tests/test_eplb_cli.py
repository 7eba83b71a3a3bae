"""`moe-monitor eplb` end to end (issue #17, part 2): the history read from a real sidecar's flight record (live
and from a file) and from a real Prometheus scraping the sidecar's per-expert series, planned and reported by the
CLI, with the placement files written. The algorithm itself is tested in tests/test_eplb.py (the published
example, hand-computed cases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from conftest import free_port

from moe_monitor.channel import Ranks, SegmentWriter, Shape
from moe_monitor.demo import launch, promstack
from moe_monitor.eplb.history import HistoryError, from_prometheus
from moe_monitor.plugin.steps import StepStats
from moe_monitor.stats.placement import load_placement

LAYERS, EXPERTS, GPUS = 2, 16, 8
HOT = 3  # expert 3 of every layer gets 16x the load of the others: 1,600 + 15 x 100 per second and layer
TOKEN = "eplb-token"  # the sidecar's API (its flight record too) needs the bearer token


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "eplb", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MOE_MONITOR_API_TOKEN": TOKEN})
    assert not check or done.returncode == 0, f"eplb {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """A real `moe-monitor serve` (1 s windows, per-expert series on) fed every 0.5 s by the plugin's segment
    writer; expert 3 is hot in both layers."""
    work = tmp_path_factory.mktemp("eplb")
    steps = StepStats()
    writer = SegmentWriter(str(work / "seg"), "eplb/test", Ranks(0, 1, 0, 1, 0, 1, 0, 1, 0, 1),
                           Shape(LAYERS, EXPERTS, len(steps.token_bounds), len(steps.duration_bounds)), top_k=2)
    counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    per_half_second = np.full((LAYERS, EXPERTS), 50, dtype=np.int64)
    per_half_second[:, HOT] = 800
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            counts[:] += per_half_second
            arrays = steps.snapshot()
            arrays.update(counts=counts, layer_ids=np.arange(LAYERS, dtype=np.int32),
                          layer_flags=np.ones(LAYERS, dtype=np.uint8))
            writer.publish(arrays)
            stop.wait(0.5)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    proc = launch.start_sidecar(str(work / "seg"), free_port(), str(work / "sidecar.log"),
                                ["--window", "1", "--expert-series", "all", "--api-token", TOKEN])
    try:
        proc.wait_ready("/healthz", 20)
        yield proc, work
    finally:
        stop.set()
        thread.join(5)
        proc.stop()
        writer.close()


def wait_for_windows(url: str, n: int, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while True:
        request = urllib.request.Request(url + "/api/flight", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            doc = json.load(r)
        if len(doc["windows"]) >= n or time.time() > deadline:
            return doc
        time.sleep(0.5)


@pytest.mark.slow
def test_live_sidecar_history_recommends_eplb_and_writes_loadable_placements(sidecar, tmp_path):
    proc, _ = sidecar
    assert len(wait_for_windows(proc.url, 5)["windows"]) >= 5
    out = cli("--live", "--url", proc.url, "--gpus", str(GPUS), "--out", str(tmp_path / "plan")).stdout
    assert "2 MoE layers x 16 experts" in out and "enable EPLB: yes" in out
    assert '--eplb-config \'{"num_redundant_experts": ' in out
    report = json.loads(cli("--live", "--url", proc.url, "--gpus", str(GPUS), "--json").stdout)
    advice = report["advice"]
    # no redundancy: expert 3 (1,600 of 3,100 per layer and second) sits on one of 8 GPUs: 1,700 / 387.5
    assert advice["baseline"]["straggler_mean"] == pytest.approx((1600 + 100) / (3100 / 8), rel=0.02)
    assert advice["enable_eplb"] and advice["recommended_num_redundant_experts"] >= GPUS
    best = next(p for p in advice["sweep"]
                if p["num_redundant_experts"] == advice["best_eplb_num_redundant_experts"])
    assert best["straggler_mean"] < 1.1
    placement = load_placement(str(tmp_path / "plan" / "moe_monitor_placement.json"))  # the sidecar's --placement
    assert placement.physical_to_logical.shape[1] == EXPERTS + advice["recommended_num_redundant_experts"]
    sglang = json.loads((tmp_path / "plan" / "sglang_init_expert_location.json").read_text())
    assert list(sglang) == ["physical_to_logical_map"] and len(sglang["physical_to_logical_map"]) == LAYERS
    assert sum(row.count(HOT) for row in sglang["physical_to_logical_map"][:1]) > 1  # the hot expert is replicated


@pytest.mark.slow
def test_a_captured_flight_record_file_gives_the_same_history(sidecar, tmp_path):
    proc, _ = sidecar
    doc = wait_for_windows(proc.url, 5)
    path = tmp_path / "flight.json"
    path.write_text(json.dumps(doc))
    report = json.loads(cli("--flight", str(path), "--gpus", str(GPUS), "--json", "--redundant", "0,8").stdout)
    total = sum(sum(map(sum, w["counts"])) for w in doc["windows"])
    assert report["history"]["assignments"] == total and report["history"]["layer_ids"] == [0, 1]
    assert [p["num_redundant_experts"] for p in report["advice"]["sweep"]] == [0, 8]


@pytest.mark.slow
def test_prometheus_range_history_matches_what_was_routed(sidecar):
    """A real Prometheus scrapes the sidecar each second; eplb reads increase() per layer and expert."""
    proc, work = sidecar
    prom = promstack.start_prometheus(str(work), free_port(), [proc.url.removeprefix("http://")], None,
                                      "groups: []\n", timing=promstack.Timing(interval="1s"))
    try:
        prom.wait_ready("/-/ready", 60)
        deadline = time.time() + 60
        while True:
            try:
                history = from_prometheus(prom.url, "30s")
                # the advice checks itself on 4 sub-ranges of its range: wait until 3 of 16 s hold traffic
                if history.load[0, 0] > 0 and sum(p.any() for p in from_prometheus(prom.url, "16s").parts) >= 3:
                    break
            except HistoryError:
                pass
            if time.time() > deadline:
                raise AssertionError(open(prom.log_path).read()[-2000:])
            time.sleep(1)
        ratio = history.load[:, HOT] / np.delete(history.load, HOT, axis=1).mean(axis=1)
        assert history.layer_ids == (0, 1) and history.load.shape == (LAYERS, EXPERTS)
        assert ratio == pytest.approx([16.0, 16.0], rel=0.05)  # 800 vs 50 per half second
        report = json.loads(cli("--prometheus", prom.url, "--range", "16s", "--gpus", str(GPUS), "--json").stdout)
        assert report["advice"]["enable_eplb"] and "increase over 16s" in report["history"]["source"], \
            report["advice"]["confidence"]
        assert report["advice"]["confidence"]["folds"] >= 3 and report["advice"]["confidence"]["stands"]
        missing = cli("--prometheus", prom.url, "--range", "30s", "--selector", 'model="none"', "--gpus", "8",
                      check=False)
        assert missing.returncode == 1 and "--expert-series all" in missing.stderr
    finally:
        prom.stop()


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8"], "give exactly one history"),
    (["--live", "--flight", "x", "--gpus", "8"], "exactly one"),
    (["--live", "--url", "http://127.0.0.1:9", "--gpus", "8"], "cannot reach"),
    (["--prometheus", "http://127.0.0.1:9", "--range", "6 hours", "--gpus", "8"], "not a Prometheus duration"),
])
def test_bad_invocations_say_what_is_wrong(args, message, tmp_path):
    if "x" in args:
        (tmp_path / "x").write_text("{}")
        args = [str(tmp_path / "x") if a == "x" else a for a in args]
    done = cli(*args, check=False)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_deployment_that_does_not_fit_is_a_clear_error(sidecar, tmp_path):
    proc, _ = sidecar
    doc = wait_for_windows(proc.url, 2)
    path = tmp_path / "flight.json"
    path.write_text(json.dumps(doc))
    done = cli("--flight", str(path), "--gpus", "32", "--redundant", "0", check=False)  # 16 experts, 32 GPUs
    assert done.returncode == 1 and "cannot plan for this deployment" in done.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "moe-monitor-flight/1", "layer_ids": [0], "experts": 2, "windows": []}')
    done = cli("--flight", str(bad), "--gpus", "2", check=False)
    assert done.returncode == 1 and "holds no windows" in done.stderr
