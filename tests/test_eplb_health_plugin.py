"""The plugin's EPLB health recording (moe_monitor/plugin/eplb_health.py) on vLLM's own EPLB code, on CPU.

vLLM's `EplbState.step` and `EplbState.rearrange` run for real: the step counter, the trigger every
`step_interval` steps, the async bail-out that leaves the counter climbing, the policy (DefaultEplbPolicy) on the
recorded load window, the all-reduce (a one-process gloo group) and the commit (`_commit_eplb_maps`,
`_commit_eplb_maps_for_layer` through `_move_to_workspace`). Stand-ins, because EPLB is GPU-only: the model state
is a namespace with vLLM's field names (the real one needs a MixtureOfExperts model), the expert-weight transfer
sleeps instead of moving weights (`rearrange_expert_weights_inplace`, `move_from_buffer`), the EP group wraps the
gloo group, and CUDA timing events are host-clock events, so vLLM's own "Rearranged experts in X s" line measures
the same stretch a GPU run would (from just after entry to just after the commit). The async worker thread is
never started: that *is* a stalled async rearrangement (the transfer that never finishes).

Imports vLLM (about 10 s on two cores): marked slow. The same tests pass against vLLM 0.26's source (the GPU test
bed's release): `PYTHONPATH=<vllm 0.26 source> pytest tests/test_eplb_health_plugin.py -m slow`."""

from __future__ import annotations

import logging
import math
import os
import re
import time
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow
TRANSFER_S = 0.05  # the stand-in weight transfer
L, E, P, INTERVAL, WINDOW = 2, 4, 6, 8, 4


class HostEvent:
    """torch.Event (torch.cuda.Event in vLLM 0.26) with the host clock: CPU torch has no such events; vLLM times a
    sync rearrangement with them on EP rank 0 and signals its async worker with one."""

    def __init__(self, enable_timing: bool = False, **kwargs):
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1000.0


@pytest.fixture
def vllm_eplb(monkeypatch):
    es = pytest.importorskip("vllm.distributed.eplb.eplb_state")
    import torch.distributed as dist

    monkeypatch.setattr(torch, "Event", HostEvent)
    monkeypatch.setattr(torch.cuda, "Event", HostEvent)
    started_here = not dist.is_initialized()
    if started_here:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    group = types.SimpleNamespace(device_group=dist.group.WORLD, cpu_group=dist.group.WORLD, world_size=1)
    monkeypatch.setattr(es, "get_ep_group", lambda: group)
    monkeypatch.setattr(es, "get_node_count", lambda: 1)
    monkeypatch.setattr(es, "rearrange_expert_weights_inplace", lambda *a, **k: time.sleep(TRANSFER_S))
    monkeypatch.setattr(es, "move_from_buffer", lambda **k: None)
    from moe_monitor.plugin import eplb_health

    monkeypatch.setattr(eplb_health, "_recorders", [])
    yield es
    if started_here:
        dist.destroy_process_group()


def build(es, is_async: bool):
    """vLLM's EplbState as add_model leaves it (its counter starts at 3/4 of the interval), with one model."""
    config = types.SimpleNamespace(eplb_config=types.SimpleNamespace(step_interval=INTERVAL, window_size=WINDOW,
                                                                     log_balancedness_interval=1))
    state = es.EplbState(config, torch.device("cpu"))
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]])
    model = types.SimpleNamespace(num_logical_experts=E, num_moe_layers=L, num_physical_experts=P, num_expert_groups=1,
                                  expert_weights=[[] for _ in range(L)])
    ms = types.SimpleNamespace(
        physical_to_logical_map=p2l.clone(), physical_to_logical_map_buffer=p2l.clone(),
        logical_to_physical_map=torch.full((L, E, 3), -1), logical_replica_count=torch.zeros(L, E, dtype=torch.long),
        expert_load_pass=torch.zeros(L, P, dtype=torch.int32),
        expert_load_window=torch.zeros(WINDOW, L, P, dtype=torch.int32), last_expert_load=None, model=model,
        model_name="tiny-moe", expert_buffer=[], communicator=None, rebalanced=False, pending_result=None,
        eplb_stats=None)
    state.model_states["tiny"] = ms
    state.expert_load_window_size = WINDOW
    state.expert_rearrangement_step_interval = INTERVAL
    state.expert_rearrangement_step = INTERVAL - INTERVAL // 4
    state.is_async = is_async
    return state, ms


def follow(state, ms):
    """What build_monitor does with EPLB on: follow the placement's commits, and record the rearrangements."""
    from moe_monitor.plugin.eplb_health import follow_eplb
    from moe_monitor.plugin.placement import LivePlacement, follow_commits

    steps = {"n": 0}
    live = LivePlacement(ms, ms.physical_to_logical_map.numpy(), 2, lambda: np.zeros((L, E), dtype=np.int64))
    follow_commits(live)
    return live, follow_eplb(state, ms, L, lambda: steps["n"]), steps


def run_steps(state, ms, steps, n: int) -> None:
    for _ in range(n):
        ms.expert_load_pass[:, 3] += 10  # expert 3 is hot: the policy replicates it
        state.step()
        steps["n"] += 1


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_sync_rearrangements_are_counted_and_timed_as_vllm_logs_them(vllm_eplb):
    es = vllm_eplb
    state, ms = build(es, is_async=False)
    live, rec, steps = follow(state, ms)
    vllm_log, logger = Lines(), logging.getLogger(es.__name__)
    level = logger.level
    logger.addHandler(vllm_log)
    logger.setLevel(logging.INFO)
    try:
        run_steps(state, ms, steps, 1)
        assert rec.record().rearrangements == 0 and rec.record().steps_since == INTERVAL - INTERVAL // 4 + 1
        run_steps(state, ms, steps, 1)  # the counter reaches the interval: vLLM rearranges (sync) inside step()
        first = rec.record()
        run_steps(state, ms, steps, INTERVAL)  # and again one interval later
        second = rec.record()
    finally:
        logger.removeHandler(vllm_log)
        logger.setLevel(level)
    assert (first.rearrangements, first.started, first.layer_commits) == (1, 1, 0)
    assert first.engine_steps_at_last == 1 and first.steps_since == 0 and first.step_interval == INTERVAL
    assert first.window_size == WINDOW and first.flags == 2  # sync, hooked, not in progress
    assert live.current.tolist() == ms.physical_to_logical_map.tolist(), "the placement followed vLLM's commit"
    assert (second.rearrangements, second.started) == (2, 2) and second.engine_steps_at_last == 1 + INTERVAL
    logged = [float(m.group(1)) for line in vllm_log.lines if (m := re.search(r"Rearranged experts .*in ([\d.]+) s",
                                                                               line))]
    assert len(logged) == 2, vllm_log.lines
    # ours: entry to commit; vLLM's: its start event (just after entry) to its end event (just after the commit),
    # rounded to 10 ms in its log line
    assert abs(second.last_duration_s - logged[1]) < 0.011 and second.last_duration_s >= TRANSFER_S
    assert second.duration_s_total == pytest.approx(first.last_duration_s + second.last_duration_s)
    assert second.last_end_unix_ns >= second.last_start_unix_ns > 0


def test_an_async_rearrangement_completes_at_its_last_layers_commit(vllm_eplb):
    es = vllm_eplb
    state, ms = build(es, is_async=True)
    live, rec, steps = follow(state, ms)
    run_steps(state, ms, steps, 2)  # vLLM starts an async rearrangement: rebalanced, the worker signalled
    r = rec.record()
    assert ms.rebalanced and r.started == 1 and r.rearrangements == 0 and r.flags == 1 | 2 | 4  # in progress
    new = [torch.tensor([0, 1, 2, 3, 3, 3]), torch.tensor([0, 1, 2, 3, 3, 1])]
    for layer in range(L):  # what the async worker hands over, one layer a step
        ms.pending_result = types.SimpleNamespace(layer_idx=layer, new_physical_to_logical_map=new[layer],
                                                  transfer_metadata=None,
                                                  consumed_event=types.SimpleNamespace(record=lambda: None))
        run_steps(state, ms, steps, 1)  # vLLM's step() moves it to the workspace and commits the layer
    r = rec.record()
    assert not ms.rebalanced and (r.rearrangements, r.layer_commits, r.flags) == (1, 2, 1 | 2)
    assert live.current.tolist() == [x.tolist() for x in new]
    # committed inside the 4th step, which the plugin counts when it ends (as vLLM's EPLB steps inside the forward)
    assert r.engine_steps_at_last == 3 and r.last_duration_s > 0 and r.steps_since == 2


def test_a_stalled_async_rearrangement_leaves_vllms_counter_climbing_past_the_interval(vllm_eplb):
    """The async worker never hands a layer over: vLLM's step() bails out before resetting its counter, forever;
    no commit, no log line, no error. What the plugin publishes shows it."""
    es = vllm_eplb
    state, ms = build(es, is_async=True)
    _, rec, steps = follow(state, ms)
    run_steps(state, ms, steps, 2 + 3 * INTERVAL)
    r = rec.record()
    assert r.started == 1 and r.rearrangements == 0 and math.isnan(r.last_duration_s)
    assert r.steps_since == 3 * INTERVAL == state.expert_rearrangement_step and r.flags & 4
    assert r.steps_since - r.step_interval >= (2 - 1) * r.step_interval, "the stall rule: 2 intervals without one"
    assert r.engine_steps == 2 + 3 * INTERVAL


def test_the_profile_run_is_not_counted(vllm_eplb):
    es = vllm_eplb
    state, ms = build(es, is_async=False)
    _, rec, _ = follow(state, ms)
    state.rearrange(is_profile=True)
    r = rec.record()
    assert (r.started, r.rearrangements) == (0, 0) and not r.flags & 4
