"""A stalled EPLB rearrangement, end to end on real servers: the real SegmentWriter publishes what the plugin's
EplbRecorder records for two ranks while their engine steps flow (vLLM's counter advanced as its EplbState.step
advances it: test_eplb_health_plugin.py drives the real one), a real `moe-monitor serve` reads the segments, and a
real Prometheus scrapes it and evaluates the generated rules with the shipped expressions (windows and `for:`
shortened to seconds). Rank 0 rearranges on time; on rank 1 an async rearrangement starts and never completes.
MoeEplbRearrangementStalled fires for the instance with stall="overdue", and not before the counter passes two
intervals."""

from __future__ import annotations

import shutil
import threading
import time
import types

import pytest
from conftest import free_port, prom_api
from test_segment_eplb import arrays

from moe_monitor.channel import Ranks, SegmentWriter, Shape
from moe_monitor.demo import launch, promstack
from moe_monitor.mixin.build import to_yaml
from moe_monitor.mixin.config import config_from_dict
from moe_monitor.mixin.rules import rules_document
from moe_monitor.plugin.eplb_health import EplbRecorder
from moe_monitor.plugin.steps import StepStats

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("prometheus"), reason="needs prometheus")]

ALERT = "MoeEplbRearrangementStalled"
INTERVAL = 1000
STEPS_PER_TICK = 100  # engine steps between publishes (every 0.25 s: 400 steps a second)
CONFIG = {"rate_window": "3s", "eplb_stalled_for": "2s"}


class Rank:
    """One rank's plugin side: vLLM's counter and the recorder, published by the real writer."""

    def __init__(self, directory: str, dp: int, stalls: bool):
        self.state = types.SimpleNamespace(expert_rearrangement_step=INTERVAL - INTERVAL // 4,
                                           expert_rearrangement_step_interval=INTERVAL, expert_load_window_size=100,
                                           is_async=True)
        self.model_state = types.SimpleNamespace(rebalanced=False)
        self.steps = 0
        self.stalls = stalls
        self.rec = EplbRecorder(self.state, self.model_state, 2, lambda: self.steps)
        st = StepStats()
        shape = Shape(2, 4, len(st.token_bounds), len(st.duration_bounds), num_physical=6, num_load_ranks=2)
        self.writer = SegmentWriter(directory, "tiny-moe", Ranks(dp_rank=dp, dp_size=2, ep_rank=dp, ep_size=2),
                                    shape, top_k=2, eplb_health=True)

    def tick(self) -> None:
        for _ in range(STEPS_PER_TICK):  # what EplbState.step does with its counter, and the async commits
            self.steps += 1
            self.state.expert_rearrangement_step += 1
            if self.model_state.rebalanced and not self.stalls:
                self.rec.committed(0)
                self.rec.committed(1)
                self.model_state.rebalanced = False
            if self.state.expert_rearrangement_step >= INTERVAL and not self.model_state.rebalanced:
                self.state.expert_rearrangement_step = 0
                self.rec.entered()
                self.model_state.rebalanced = True
                self.rec.returned()
        self.writer.publish(arrays(), eplb=self.rec.record())


def firing(prom) -> list[dict]:
    return prom_api(prom, "query", query=f'ALERTS{{alertname="{ALERT}",alertstate="firing"}}')["result"]


def overdue(prom) -> dict[str, float]:
    result = prom_api(prom, "query", query="moe_eplb_rearrangement_overdue_steps")["result"]
    return {r["metric"]["segment"]: float(r["value"][1]) for r in result}


def test_a_stalled_async_rearrangement_fires_the_shipped_alert_through_real_prometheus(tmp_path):
    segments = str(tmp_path / "segments")
    ranks = [Rank(segments, 0, stalls=False), Rank(segments, 1, stalls=True)]
    for r in ranks:
        r.tick()
    stop = threading.Event()

    def publish_loop() -> None:
        while not stop.wait(0.25):
            for r in ranks:
                r.tick()

    procs = []
    try:
        sidecar = launch.start_sidecar(segments, free_port(), str(tmp_path / "sidecar.log"), ["--window", "1"])
        procs.append(sidecar)
        sidecar.wait_ready("/metrics", 60)
        rules = to_yaml(rules_document(config_from_dict(CONFIG)))
        prom = promstack.start_prometheus(str(tmp_path), free_port(), [sidecar.url.removeprefix("http://")], None,
                                          rules, timing=promstack.Timing(interval="1s"))
        procs.append(prom)
        prom.wait_ready("/-/ready", 60)
        publisher = threading.Thread(target=publish_loop, daemon=True)
        publisher.start()
        deadline, fired_at, seen = time.time() + 60, None, []
        while time.time() < deadline:
            now = overdue(prom)
            alerts = firing(prom)
            seen.append((now, len(alerts)))
            if alerts:
                fired_at = now
                break
            time.sleep(0.5)
        assert fired_at is not None, f"{ALERT} never fired; overdue steps seen: {seen[-5:]}\n{sidecar.log_tail()}"
        labels = alerts[0]["metric"]
        assert labels["stall"] == "overdue" and labels["instance"] == sidecar.url.removeprefix("http://")
        assert "segment" not in labels  # one alert per instance
        # it fired once the stalled rank's counter was 2 intervals in, never for the rank that rearranges on time
        assert fired_at.get("dp1-pp0-tp0", 0) >= INTERVAL and fired_at.get("dp0-pp0-tp0") == 0, fired_at
        assert all(n == 0 for o, n in seen[:-1] if o.get("dp1-pp0-tp0", 0) < INTERVAL), seen
        print(f"\n  {ALERT} firing with overdue steps {fired_at} after {len(seen)} polls")
    finally:
        stop.set()
        for p in reversed(procs):
            p.stop()
