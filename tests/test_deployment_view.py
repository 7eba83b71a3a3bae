"""A deployment larger than one node, on real components: one EP=4 model (4 DP ranks, dp_size = ep_size = 4, TP 1,
a known skewed routing) whose ranks' segments are read by three real sidecars: A reads ranks 0-1 (one "node"), B
ranks 2-3 (the other), C all four (what one sidecar seeing the whole model reports). A real Prometheus with the
generated rules scrapes them; A and B get the target labels LWS gives a group's pods, C another group's, and the
multi-node ServiceMonitor's own relabelings (deploy/kubernetes/multinode/servicemonitor.yaml) turn those into the
`deployment` label: A and B are deployment "inference/dsv3-0", C alone "inference/single-0".

Shown: the deployment figures summed over A and B are C's figures, per layer and EP rank (and per expert), equal
to the known routing; the deployment alert fires once per deployment while the per-node MoeEPRankImbalance stays
silent for labelled sidecars; every query of the MoE deployment dashboard returns data.

Why the counts jump once and then hold: rate() over a range divides by the span of the samples it finds, which
depends on each target's scrape phase. A single jump that every target's range holds from both sides (before and
after) makes each target's rate (P1 - P0) / span with the same span (one scrape a second, the same number of
samples), so the sums compare to the scrape timing (ACROSS_TARGETS); one target's series against each other
exactly. The rule expressions are evaluated by the query API at a time in the middle of
that stretch, when every sample is ingested (a rule evaluation can miss a scrape still in flight); the recorded
series are checked against them too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import free_port, prom_api, queries_without_data
from fixtures.make_segments import segment

from moe_monitor.channel.layout import Ranks
from moe_monitor.demo import launch, promstack
from moe_monitor.mixin import dashboards
from moe_monitor.mixin.build import to_yaml
from moe_monitor.mixin.config import config_from_dict
from moe_monitor.mixin.dashboards.overview import NEEDS_EP
from moe_monitor.mixin.queries import iter_panels, panel_queries
from moe_monitor.mixin.rules import (
    DEPLOYMENT_EP_EXPERT_TIME_LOST,
    DEPLOYMENT_EP_RANK_ROUTED_RATE,
    DEPLOYMENT_EXPERT_ROUTED_RATE,
    DEPLOYMENT_LAYER_EP_RANK_IMBALANCE,
    DEPLOYMENT_LAYER_EXPERT_IMBALANCE,
    EP_RANK_ROUTED_RATE,
    LAYER_EP_RANK_IMBALANCE,
    rules_document,
)
from moe_monitor.plugin.steps import StepStats

pytestmark = pytest.mark.slow  # real Prometheus + three sidecars, waits for scrapes: ~30 s

ROOT = Path(__file__).resolve().parents[1]
SERVICEMONITOR = ROOT / "deploy" / "kubernetes" / "multinode" / "servicemonitor.yaml"

L, E, W, TOP_K = 3, 16, 4, 2  # layers, experts, EP ranks = DP ranks (contiguous: rank r has experts 4r..4r+3)
NODES = {"a": (0, 1), "b": (2, 3), "c": (0, 1, 2, 3)}  # which DP ranks' segments each sidecar reads
DSV3, SINGLE = "inference/dsv3-0", "inference/single-0"
RATE_WINDOW = 10  # seconds: rate_window of the rules below; one scrape and one rule evaluation a second
# Figures of different targets (A+B against C) agree to the scrape timing: each sample carries its scrape's actual
# start time; Prometheus aligns a timestamp within 2 ms of its schedule, and a scrape later than that under load (the
# 2-core VM with other work: 588.91 against 588.89 once) changes that target's span by milliseconds in seconds.
ACROSS_TARGETS = 1e-3
TEST_CONFIG = {"rate_window": f"{RATE_WINDOW}s", "ep_rank_imbalance_for": "2s", "min_expert_load": 0}


def routing(seed: int = 5) -> np.ndarray:
    """Assignments per DP rank, layer and expert [W, L, E] of the jump: a base load plus hot experts. Layer 0: the
    ranks of node a send theirs to expert 1 (EP rank 0), node b's to expert 13 (EP rank 3); layer 1: every rank to
    expert 6 (EP rank 1); layer 2: only DP rank 3, to expert 10 (EP rank 2)."""
    rng = np.random.default_rng(seed)
    jump = rng.integers(40, 120, size=(W, L, E)).astype(np.int64)
    jump[[0, 1], 0, 1] += 2000
    jump[[2, 3], 0, 13] += 1200
    jump[:, 1, 6] += 1500
    jump[3, 2, 10] += 900
    return jump


def ep_rank_load(counts: np.ndarray) -> np.ndarray:
    """[..., E] -> [..., W] under the contiguous placement."""
    return counts.reshape(*counts.shape[:-1], W, E // W).sum(-1)


def max_over_mean(x: np.ndarray) -> np.ndarray:
    return x.max(-1) / x.mean(-1)


class Segments:
    """Writes the four ranks' segments into each sidecar's directory (whole files, renamed into place)."""

    def __init__(self, root: Path):
        self.dirs = {node: root / node for node in NODES}
        for d in self.dirs.values():
            d.mkdir()
        self.steps = StepStats()
        self.steps.record_step("decode", 4, 0.004)

    def write(self, counts: np.ndarray) -> None:
        now = time.time()
        for dp in range(W):
            ranks = Ranks(global_rank=dp, world_size=W, dp_rank=dp, dp_size=W, ep_rank=dp, ep_size=W)
            data = segment(ranks, counts[dp], self.steps, layer_ids=np.arange(L, dtype=np.int32),
                           layer_flags=np.ones(L, dtype=np.uint8), generation=7000 + dp, created_s=now - 60,
                           updated_s=now, pid=4000 + dp, top_k=TOP_K, model="test/dsv3-tiny")
            for node, ranks_read in NODES.items():
                if dp in ranks_read:
                    tmp = self.dirs[node] / f"dp{dp}-pp0-tp0.tmp"  # not *.moeseg: the sidecar does not list it
                    tmp.write_bytes(data)
                    os.replace(tmp, self.dirs[node] / f"dp{dp}-pp0-tp0.moeseg")


def lws_target_labels(name: str) -> dict[str, str]:
    """The discovery labels Prometheus has for a LeaderWorkerSet pod of group 0 of `name` in namespace inference."""
    return {"__meta_kubernetes_namespace": "inference",
            "__meta_kubernetes_pod_label_leaderworkerset_sigs_k8s_io_name": name,
            "__meta_kubernetes_pod_label_leaderworkerset_sigs_k8s_io_group_index": "0"}


def servicemonitor_relabel_configs() -> list[dict]:
    """The sidecar endpoint's relabelings of the multi-node ServiceMonitor, in Prometheus' configuration keys."""
    monitor = yaml.safe_load(SERVICEMONITOR.read_text())
    (endpoint,) = [e for e in monitor["spec"]["endpoints"] if e["port"] == "metrics"]
    keys = {"action": "action", "sourceLabels": "source_labels", "separator": "separator", "regex": "regex",
            "replacement": "replacement", "targetLabel": "target_label", "modulus": "modulus"}
    return [{keys[k]: v for k, v in r.items()} for r in endpoint["relabelings"]]


def instant(prom, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    return prom_api(prom, "query", **params)["result"]


def by(result: list[dict], *labels: str) -> dict[tuple, float]:
    return {tuple(r["metric"].get(k) for k in labels): float(r["value"][1]) for r in result}


def inlined(cfg, name: str) -> str:
    """A recording rule's expression with the records it reads replaced by their own expressions: the rule as the
    query API evaluates it, from raw series only."""
    exprs = {r["record"]: r["expr"] for g in rules_document(cfg)["groups"] for r in g["rules"] if "record" in r}
    expr = exprs[name]
    while True:
        inner = next((n for n in exprs if re.search(re.escape(n) + r"(?![\w:])", expr)), None)
        if inner is None:
            return expr
        expr = re.sub(re.escape(inner) + r"(?![\w:])", lambda _, name=inner: f"({exprs[name]})", expr)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def ep_capture(directory: Path) -> Path:
    """A profile directory holding both ranks' traces of benchmarks/ep_stack.py (an EP=2 capture), written a while
    ago so the sidecar takes them as complete."""
    directory.mkdir()
    for rank in (0, 1):
        name = f"cpu_ep_stack_gloo_dp{rank}_pp0_tp0_ep{rank}_rank{rank}.pt.trace.json.gz"
        shutil.copy(ROOT / "tests" / "fixtures" / "traces" / name, directory / name)
        os.utime(directory / name, (time.time() - 100, time.time() - 100))
    return directory


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    try:
        promstack.binary("prometheus")
    except promstack.MissingTool as e:
        pytest.fail(str(e))
    work = tmp_path_factory.mktemp("deployment")
    cfg = config_from_dict(TEST_CONFIG)
    segments = Segments(work)
    base = np.random.default_rng(1).integers(1000, 3000, size=(W, L, E)).astype(np.int64)
    segments.write(base)
    procs = []
    try:
        profiles = ep_capture(work / "profiles")  # C analyses it: what EP-rank imbalance costs of step time
        sidecars = {node: launch.start_sidecar(str(d), free_port(), str(work / f"sidecar-{node}.log"), [
            "--window", "1", "--expert-series", "all", "--min-window-assignments", "1", "--stale-after", "3600"]
            + (["--profile-dir", str(profiles)] if node == "c" else []))
            for node, d in segments.dirs.items()}
        procs += sidecars.values()
        address = {node: p.url.removeprefix("http://") for node, p in sidecars.items()}
        prom = promstack.start_prometheus(
            str(work), free_port(),
            [{"targets": [address["a"], address["b"]], "labels": lws_target_labels("dsv3")},
             {"targets": [address["c"]], "labels": lws_target_labels("single")}],
            None, to_yaml(rules_document(cfg)), timing=promstack.Timing(interval="1s"),
            relabel_configs=servicemonitor_relabel_configs())
        procs.append(prom)
        for p in sidecars.values():
            p.wait_ready("/healthz", 60)
        prom.wait_ready("/-/ready", 60)
        yield {"cfg": cfg, "prom": prom, "sidecars": sidecars, "address": address, "segments": segments,
               "base": base, "started": time.time()}
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def jump(stack):
    """Holds the base counts until each target has been scraped at least RATE_WINDOW / 2 times, then adds the
    routing() jump once, mid-window. Returns (jump, T): T is a time whose rate range holds samples from before and
    after the jump for every target."""
    prom = stack["prom"]
    samples = f'count_over_time(moe_ep_rank_routed_tokens_total{{layer="0", ep_rank="0"}}[{RATE_WINDOW}s])'
    wait_for(lambda: len([r for r in instant(prom, samples) if float(r["value"][1]) >= RATE_WINDOW / 2]) == 3, 60,
             "every sidecar scraped with the base counts")
    sleep_until(math.floor(time.time()) + 1.5)  # mid-window: every sidecar reads it at the same boundary
    routed = routing()
    stack["segments"].write(stack["base"] + routed)
    boundary = math.ceil(time.time())  # the window boundary after which every sidecar exports the jump
    at = boundary + RATE_WINDOW / 2 + 0.5
    sleep_until(at + 2)
    print(f"\njump exported from {boundary}, figures compared at T = {at} ({at - stack['started']:.1f} s in)")
    return routed, at


def test_deployment_ep_rank_rates_are_the_single_sidecar_rates(stack, jump):
    prom, cfg, address = stack["prom"], stack["cfg"], stack["address"]
    routed, at = jump
    deployment = by(instant(prom, inlined(cfg, DEPLOYMENT_EP_RANK_ROUTED_RATE), at), "deployment", "layer", "ep_rank")
    per_instance = by(instant(prom, inlined(cfg, EP_RANK_ROUTED_RATE), at), "instance", "layer", "ep_rank")
    assert {k[0] for k in deployment} == {DSV3, SINGLE}
    assert {k[0] for k in per_instance} == set(address.values())
    expected = ep_rank_load(routed.sum(0))  # [L, W] assignments each EP rank received in the jump
    span = None
    for layer in range(L):
        for rank in range(W):
            key = (str(layer), str(rank))
            summed, single = deployment[(DSV3, *key)], per_instance[(address["c"], *key)]
            assert summed == pytest.approx(single, rel=ACROSS_TARGETS), (layer, rank)
            assert deployment[(SINGLE, *key)] == pytest.approx(single, rel=1e-9, abs=1e-9)  # C's own series
            assert summed == pytest.approx(per_instance[(address["a"], *key)] + per_instance[(address["b"], *key)],
                                           rel=1e-9)
            span = expected[layer, rank] / summed  # seconds the samples spanned; the same for every series
            assert span == pytest.approx(RATE_WINDOW - 1, rel=0.02), (layer, rank, span)
    print(f"deployment = C per EP rank (rel 1e-9): {L * W} series; e.g. layer 0 "
          f"{[round(deployment[(DSV3, '0', str(r))], 3) for r in range(W)]} assignments/s, span {span:.4f} s")
    # Each node alone sees a different spread: only the sum is the deployment's.
    node_a = by(instant(prom, inlined(cfg, LAYER_EP_RANK_IMBALANCE), at), "instance", "layer")
    assert node_a[(address["a"], "0")] != pytest.approx(node_a[(address["c"], "0")], rel=0.05)

    recorded = by(instant(prom, DEPLOYMENT_EP_RANK_ROUTED_RATE, at), "deployment", "layer", "ep_rank")
    assert recorded.keys() == deployment.keys()
    for key, value in recorded.items():  # within a scrape in flight at the rule's evaluation (module docstring)
        assert value == pytest.approx(deployment[key], rel=0.15), key
    exact = sum(value == pytest.approx(deployment[key], rel=1e-9) for key, value in recorded.items())
    print(f"recorded series equal to the query-time evaluation: {exact}/{len(recorded)}")


def test_deployment_imbalance_is_the_single_sidecar_imbalance(stack, jump):
    prom, cfg, address = stack["prom"], stack["cfg"], stack["address"]
    routed, at = jump
    deployment = by(instant(prom, inlined(cfg, DEPLOYMENT_LAYER_EP_RANK_IMBALANCE), at), "deployment", "layer")
    single = by(instant(prom, inlined(cfg, LAYER_EP_RANK_IMBALANCE), at), "instance", "layer")
    expected = max_over_mean(ep_rank_load(routed.sum(0)))  # [L]
    for layer in range(L):
        assert deployment[(DSV3, str(layer))] == pytest.approx(single[(address["c"], str(layer))], rel=ACROSS_TARGETS)
        assert deployment[(DSV3, str(layer))] == pytest.approx(expected[layer], rel=ACROSS_TARGETS)
        assert deployment[(SINGLE, str(layer))] == pytest.approx(expected[layer], rel=1e-9)
    assert min(expected) > 1.1 and max(expected) > 2
    print(f"EP-rank max/mean per layer, deployment (A+B) = C = routing: {[round(float(x), 6) for x in expected]}")

    # Expert time lost to EP-rank imbalance over the deployment: 1 - sum_l mean_l / sum_l max_l of the summed loads.
    loads = ep_rank_load(routed.sum(0))  # [L, W]
    lost_expected = 1 - loads.mean(-1).sum() / loads.max(-1).sum()
    lost = by(instant(prom, inlined(cfg, DEPLOYMENT_EP_EXPERT_TIME_LOST), at), "deployment")
    assert lost.keys() == {(DSV3,), (SINGLE,)}
    assert lost[(DSV3,)] == pytest.approx(lost_expected, rel=ACROSS_TARGETS)
    assert lost[(SINGLE,)] == pytest.approx(lost_expected, rel=1e-9)
    assert 0.2 < lost_expected < 0.8
    print(f"expert time lost to EP-rank imbalance, deployment (A+B) = C = routing: {lost_expected:.6f}")

    experts = by(instant(prom, inlined(cfg, DEPLOYMENT_EXPERT_ROUTED_RATE), at), "deployment", "layer", "expert")
    expert_imbalance = by(instant(prom, inlined(cfg, DEPLOYMENT_LAYER_EXPERT_IMBALANCE), at), "deployment", "layer")
    for layer in range(L):
        for e in range(E):
            assert experts[(DSV3, str(layer), str(e))] == pytest.approx(experts[(SINGLE, str(layer), str(e))],
                                                                      rel=ACROSS_TARGETS)
        assert expert_imbalance[(DSV3, str(layer))] == pytest.approx(max_over_mean(routed.sum(0))[layer],
                                                                     rel=ACROSS_TARGETS)
        assert expert_imbalance[(SINGLE, str(layer))] == pytest.approx(expert_imbalance[(DSV3, str(layer))],
                                                                      rel=ACROSS_TARGETS)
    print(f"expert max/mean per layer: {[round(float(x), 6) for x in max_over_mean(routed.sum(0))]}")


def alerts(prom, name: str) -> dict[tuple, str]:
    return {(a["labels"].get("deployment"), a["labels"].get("instance")): a["state"]
            for a in prom_api(prom, "alerts")["alerts"] if a["labels"]["alertname"] == name}


@pytest.fixture(scope="module")
def steady(stack, jump):
    """Steady skewed traffic (the jump's routing, a twentieth every half second) for longer than the rate window,
    so that nothing of the jump is left in any figure, until the deployment alert fires for both deployments."""
    prom, segments = stack["prom"], stack["segments"]
    counts = stack["base"] + jump[0]
    stop = threading.Event()

    def traffic():
        nonlocal counts
        while not stop.wait(0.5):
            counts = counts + jump[0] // 20
            segments.write(counts)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        onset = time.time()
        time.sleep(RATE_WINDOW + 4)
        wait_for(lambda: alerts(prom, "MoeDeploymentEPRankImbalance") == {(DSV3, None): "firing",
                                                                         (SINGLE, None): "firing"}, 60,
                 "MoeDeploymentEPRankImbalance firing for both deployments")
        print(f"\nsteady skewed traffic for {time.time() - onset:.1f} s: MoeDeploymentEPRankImbalance firing")
    finally:
        stop.set()
        thread.join(10)
    return time.time()


def test_the_deployment_alert_fires_per_deployment_and_the_node_alert_stays_silent(stack, steady):
    prom = stack["prom"]
    firing = prom_api(prom, "alerts")["alerts"]
    deployment = [a for a in firing if a["labels"]["alertname"] == "MoeDeploymentEPRankImbalance"]
    assert len(deployment) == 2, deployment  # one per deployment, not one per node
    for a in deployment:
        assert a["labels"].keys() == {"alertname", "severity", "job", "deployment"}, a["labels"]
        assert float(a["value"]) > 1.5 and a["annotations"]["summary"].endswith(f"{a['labels']['deployment']}.")
    # Every sidecar here carries the deployment label, and every one's own per-window EP-rank figure is above the
    # threshold (layer 1): the per-node alert leaves them to the deployment alert, pending included.
    own = by(instant(prom, 'max by (instance) (max_over_time(moe_layer_ep_rank_imbalance_ratio{layer="1"}[30s]))'),
             "instance")
    assert len(own) == 3 and min(own.values()) > 1.5, own
    history = instant(prom, 'count_over_time(ALERTS{alertname="MoeEPRankImbalance"}[5m])')
    assert not history, history


def test_every_deployment_dashboard_query_returns_data(stack, steady):
    prom, started = stack["prom"], stack["started"]
    layers = prom_api(prom, "label/layer/values", **{"match[]": 'moe_layer_observable{job="moe-monitor"}'})
    assert layers == ["0", "1", "2"]
    deployments = prom_api(prom, "label/deployment/values", **{"match[]": 'up{job="moe-monitor"}'})
    assert deployments == [DSV3, SINGLE]
    # no namespace on these targets: the variable is empty, as Grafana leaves a query variable without values
    variables = {"datasource": "prometheus", "job": ["moe-monitor"], "namespace": "", "deployment": DSV3,
                 "layer": layers}
    dash = dashboards.build(stack["cfg"])["moe-deployment.json"]
    end = time.time()
    checked, empty = queries_without_data(prom, dash, variables, started, end, 1, rate_interval="4s",
                                          range_="60s", interval="1s")
    print(f"\n{checked} deployment dashboard queries checked, {len(empty)} without data")
    assert checked >= 15 and not empty, "queries without data:\n" + "\n".join(empty)
    # Another namespace's deployment of the same name is another deployment: every query is scoped by namespace,
    # so with a namespace these sidecars do not have, no query finds anything of theirs (but the variables that
    # list the jobs and the namespaces to choose from).
    _, empty = queries_without_data(prom, dash, variables | {"namespace": "elsewhere"}, started, end, 1,
                                    rate_interval="4s", range_="60s", interval="1s")
    found = [(q.kind, q.panel) for q in panel_queries(dash)
             if f"{q.panel} [{q.kind} {q.ref_id}]: {q.expr}" not in empty]
    assert found == [("variable", "job"), ("variable", "namespace")], found


def test_the_overview_panels_of_what_ep_rank_imbalance_costs_return_data(stack, steady):
    """The overview's panels that have no data with one EP rank (test_e2e_prometheus's vLLM has one), here over an
    EP=4 model: C's step-time figure from the EP capture in its profile directory."""
    prom, started, address = stack["prom"], stack["started"], stack["address"]
    dash = dashboards.build(stack["cfg"])["moe-overview.json"]
    panels = [p for p in iter_panels(dash) if p.get("title") in NEEDS_EP]
    assert len(panels) == len(NEEDS_EP)
    variables = {"datasource": "prometheus", "job": ["moe-monitor"], "instance": [address["c"]],
                 "model": ["test/dsv3-tiny"], "layer": ["0", "1", "2"]}
    checked, empty = queries_without_data(prom, {"panels": panels}, variables, started, time.time(), 1,
                                          rate_interval="4s", range_="60s", interval="1s")
    assert checked == 3 and not empty, "queries without data:\n" + "\n".join(empty)
    c = address["c"]
    lost = by(instant(prom, f'max_over_time(moe_ep_step_time_lost_ratio{{instance="{c}"}}[60s])'), "instance")
    assert 0 < lost[(c,)] < 1, lost
    print(f"\nC's step time lost to EP-rank imbalance, the most of a window: {lost[(c,)]:.4f}")
