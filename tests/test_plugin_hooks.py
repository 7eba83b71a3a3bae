"""The plugin's per-step hooks: the phase of a step read from vLLM's scheduler output, and forwards that are not
steps (vLLM's dummy runs) counting nothing, proved in a real vLLM CPU engine."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from moe_monitor.plugin.worker import prefill_tokens


def step(new: dict[str, int], cached: dict[str, tuple[int, int]], resumed=()):
    """A scheduler output: new requests {id: tokens}, cached requests {id: (tokens, output tokens so far)}."""
    scheduled = dict(new) | {r: n for r, (n, _) in cached.items()}
    return SimpleNamespace(
        num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(cached), num_output_tokens=[o for _, o in cached.values()],
                                              resumed_req_ids=set(resumed)))


PHASE_CASES = [
    ({}, {f"r{i}": (1, 5) for i in range(128)}, (), 0),  # pure decode: the fast path
    ({"a": 300}, {"b": (1, 3), "c": (1, 9)}, (), 300),  # a new prompt beside two decodes
    ({"a": 300}, {}, (), 300),  # a new prompt alone
    ({}, {"b": (1, 3), "c": (200, 0)}, (), 200),  # a prompt still being chunked (no output yet)
    ({}, {"b": (1, 3), "c": (1, 0)}, (), 1),  # its last chunk is one token: still prompt
    ({}, {"b": (1, 3), "c": (40, 7)}, {"c"}, 40),  # resumed after preemption: recomputes its tokens
    ({}, {"b": (4, 3)}, (), 0),  # speculative decoding: four tokens of one decoding request
]


@pytest.mark.parametrize("new, cached, resumed, prefill", PHASE_CASES)
def test_prefill_tokens_of_a_step(new, cached, resumed, prefill):
    assert prefill_tokens(step(new, cached, resumed)) == prefill


@pytest.mark.parametrize("without_resumed", [False, True], ids=["vllm", "no resumed_req_ids"])
@pytest.mark.parametrize("new, cached, resumed, prefill", PHASE_CASES)
def test_the_step_hook_counts_each_step_in_its_phase(new, cached, resumed, prefill, without_resumed):
    """What the step hook counts for a step: the phase and tokens that prefill_tokens + phase_of give, also for a
    scheduler output without resumed_req_ids (a hook that classifies inline must agree with them)."""
    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.step_timer import HostTimer
    from moe_monitor.plugin.steps import PHASE_INDEX, StepStats, phase_of
    from moe_monitor.plugin.worker import WorkerMonitor

    stats = StepStats()
    monitor = WorkerMonitor(Recorder(1, 4, 2, "cpu"), publisher=None, timer=HostTimer(stats))
    output = step(new, cached, resumed)
    if without_resumed:
        if resumed:
            pytest.skip("a resumed request needs resumed_req_ids")
        del output.scheduled_cached_reqs.resumed_req_ids
    monitor.step_begin(output)
    monitor.step_end()
    tokens = output.total_num_scheduled_tokens
    phase = PHASE_INDEX[phase_of(prefill, tokens - prefill)]
    snap = stats.snapshot()
    assert snap["step_count"].sum() == 1 and snap["step_count"][phase].sum() == 1
    assert snap["step_tokens"][phase].sum() == tokens and snap["step_hist"][phase].sum() == 1


PROBE = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0, dtype="float32",
              enable_prefix_caching=False, gpu_memory_utilization=0.5)
    llm.generate(["the hot blaze of the sun", "a quiet evening"], SamplingParams(max_tokens=4, temperature=0.0),
                 use_tqdm=False)

    def dummy_runs(worker):
        monitor = worker._moe_monitor
        rec = monitor.recorder
        before = int(rec.host_counts().sum())
        routed = []
        record = rec.record
        rec.record = lambda row, ids: (routed.append(int(ids.shape[0])), record(row, ids))
        worker.execute_dummy_batch()          # what an idle DP rank runs
        worker.model_runner._dummy_run(16)    # any other dummy forward
        rec.record = record
        return {"before": before, "after": int(rec.host_counts().sum()), "routed_rows": sum(routed),
                "zero_after_forward": monitor.zero_after_forward,
                "reads_vllm": monitor.vllm_tokens is not None}

    result = llm.collective_rpc(dummy_runs)[0]
    llm.generate(["the hot blaze of the sun", "a quiet evening"], SamplingParams(max_tokens=4, temperature=0.0),
                 use_tqdm=False)
    result["again"] = llm.collective_rpc(lambda w: int(w._moe_monitor.recorder.host_counts().sum()))[0]
    result["still_reads_vllm"] = llm.collective_rpc(lambda w: w._moe_monitor.vllm_tokens is not None)[0]
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)
""")


@pytest.mark.slow  # a vLLM CPU engine in a subprocess: ~25 s
def test_dummy_runs_after_serving_count_nothing(tiny_model, tmp_path):
    """vLLM's dummy runs (an idle DP rank's `execute_dummy_batch`, warm-ups) are forwards through the tapped routers
    with no step around them: the gate is closed around each (vLLM leaves the step count it pads its buffer with at
    the last real step's), so the step before them is not counted again, and nothing is written in any step."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", MOE_MONITOR_SEGMENT_DIR=str(tmp_path),
               VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, tiny_model[0]], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["before"] > 0, result  # the generate was counted
    assert result["routed_rows"] > 0, result  # the dummy forwards did go through the taps...
    assert result["after"] == result["before"], result  # ...and counted nothing
    assert result["zero_after_forward"] is False, result  # zeroed before dummy runs, not after every step
    # the step's count is vLLM's own (nothing written a step), checked against the scheduler's in every step so far
    assert result["reads_vllm"] and result["still_reads_vllm"], result
    # after the dummy runs real steps count again: the same generate counts what the first one did
    assert result["again"] == 2 * result["before"], result


class FakeDevice:
    """Events for CudaEventTimer's logic: a record queues the event on the stream; `run(t)` is the device reaching
    time t with everything queued done (stamped t), `run(t, upto)` with the first `upto` records done."""

    def __init__(self):
        self.created, self.recorded, self.queue = 0, 0, []

    def new(self):
        self.created += 1
        return SimpleNamespace(stamp=None, index=-1)

    def record(self, event) -> None:
        event.stamp, event.index = None, self.recorded
        self.recorded += 1
        self.queue.append(event)

    def run(self, t: float, upto: int | None = None) -> None:
        done = [e for e in self.queue if upto is None or e.index < upto]
        for event in done:
            event.stamp = t
        self.queue = [e for e in self.queue if e not in done]

    @staticmethod
    def elapsed_s(start, end):
        return None if start.stamp is None or end.stamp is None else end.stamp - start.stamp


def test_the_cuda_timer_chains_steps_while_the_device_is_busy_and_reuses_its_events():
    """vLLM prepares step N+1 while the device runs step N: step N+1 starts when N ends (the previous end event
    is its start, nothing recorded); after an idle gap the step records its own start. Events are pooled."""
    from moe_monitor.plugin.step_timer import CudaEventTimer
    from moe_monitor.plugin.steps import PHASE_INDEX, StepStats

    steps, dev = StepStats(), FakeDevice()
    timer = CudaEventTimer(steps, dev)
    timer.begin("prefill", 100)
    dev.run(0.0)
    timer.end()
    for i in range(50):  # back to back: each begins while the previous one still runs on the device
        timer.begin("decode", 4, chained=True)
        dev.run(0.010 + 0.002 * i)  # the previous step ends (prefill: 10 ms, then a decode every 2 ms)
        timer.end()
    dev.run(0.110)
    dev.run(1.0)  # idle
    timer.begin("decode", 4, chained=True)  # the device is idle: its own start, the gap is not part of the step
    dev.run(1.0)
    timer.end()
    dev.run(1.003)
    timer.begin("decode", 4, chained=True)  # resolves the last one
    timer.cancel()
    snap = steps.snapshot()
    prefill, decode = PHASE_INDEX["prefill"], PHASE_INDEX["decode"]
    assert int(snap["step_hist"][prefill].sum()) == 1 and abs(snap["step_seconds"][prefill].sum() - 0.010) < 1e-9
    assert int(snap["step_hist"][decode].sum()) == 51
    assert abs(snap["step_seconds"][decode].sum() - (50 * 0.002 + 0.003)) < 1e-9, snap["step_seconds"][decode]
    assert dev.created <= 4, f"{dev.created} events created for 52 steps: the pool must reuse them"
    assert timer._pending == collections.deque() and timer._open is None


def run_steps(monitor, dev, outputs, step_s: float = 0.002, lag: int = 1) -> None:
    """vLLM's loop as the device sees it: step k's hooks run on the host while the device still runs step k - lag
    (1: vLLM's host one step ahead). Step m runs from m x step_s to (m + 1) x step_s; when it ends, everything
    recorded before step m + 1's work was queued (in its step_begin) is done."""
    begins = []  # records made up to each step's begin hook
    for k, output in enumerate(outputs):
        monitor.step_begin(output)
        begins.append(dev.recorded)
        if k == 0:
            dev.run(0.0, begins[0])
        if k >= lag:
            dev.run(step_s * (k - lag + 1), begins[k - lag + 1])  # step k - lag ends
        monitor.step_end()
    for m in range(max(0, len(outputs) - lag), len(outputs)):
        dev.run(step_s * (m + 1), begins[m + 1] if m + 1 < len(outputs) else None)


def sampled_monitor(every: int, seed: int = 7):
    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.step_timer import CudaEventTimer
    from moe_monitor.plugin.steps import StepStats
    from moe_monitor.plugin.worker import WorkerMonitor

    dev = FakeDevice()
    monitor = WorkerMonitor(Recorder(1, 4, 2, "cpu"), publisher=None, timer=CudaEventTimer(StepStats(), dev),
                            time_every=every, seed=seed)
    return monitor, dev


def test_one_step_in_n_is_timed_and_every_step_is_counted():
    """On CUDA the hooks time a pseudo-random 1 in N steps: the step count and tokens stay exact, the histogram
    holds about steps / N steps, and each timed step's duration is its own (2 ms here), not the span since the last
    timed step: a timed step after untimed ones records its own start."""
    from moe_monitor.plugin.steps import PHASE_INDEX

    monitor, dev = sampled_monitor(every=8)
    decode = step({}, {f"r{i}": (1, 5) for i in range(4)})
    run_steps(monitor, dev, [step({"p": 300}, {})] + [decode] * 1999, lag=3)  # the device 3 steps behind
    monitor.timer.poll()  # what the next timed step would do first
    snap = monitor.steps.snapshot()
    d, p = PHASE_INDEX["decode"], PHASE_INDEX["prefill"]
    assert int(snap["step_count"][d].sum()) == 1999 and int(snap["step_count"][p].sum()) == 1
    assert int(snap["step_tokens"][d].sum()) == 4 * 1999 and int(snap["step_tokens"][p].sum()) == 300
    timed = int(snap["step_hist"].sum())
    assert 200 <= timed <= 300, f"{timed} of 2000 steps timed at 1 in 8"  # binomial: 250 +- 3.4 sigma
    assert abs(snap["step_seconds"].sum() - 0.002 * timed) < 1e-9, "a timed step's time is not its own"
    assert monitor.steps.recorded == 2000


def test_every_step_is_timed_at_one_in_one_and_chains_its_events():
    monitor, dev = sampled_monitor(every=1)
    run_steps(monitor, dev, [step({}, {"a": (1, 5)})] * 100)
    monitor.timer.poll()
    snap = monitor.steps.snapshot()
    assert int(snap["step_hist"].sum()) == 100 == int(snap["step_count"].sum())
    assert abs(snap["step_seconds"].sum() - 0.2) < 1e-9
    assert dev.created <= 4, "back-to-back timed steps take the previous end as their start"


@pytest.mark.parametrize("every", [1, 2])
def test_a_timed_step_that_never_ends_is_dropped_not_stretched_over_the_next(every):
    """A step whose output never came (no step_end) must not end at a later step's end: the next step's begin
    drops it, whether that step has tokens or not, timed or not."""
    monitor, dev = sampled_monitor(every=every)
    monitor._countdown = 1  # the next step is timed
    monitor.step_begin(step({}, {"a": (1, 5)}))
    dev.run(0.001)
    monitor.step_begin(step({}, {}))  # no tokens: nothing ran; the open step is dropped, not kept open
    assert monitor.timer._open is None and not monitor._timing
    monitor.step_end()
    monitor._countdown = 1
    monitor.step_begin(step({}, {"a": (1, 5)}))  # timed, never ends
    dev.run(0.002)
    monitor._countdown = 2
    monitor.step_begin(step({}, {"a": (1, 5)}))  # untimed: drops it
    dev.run(0.003)
    monitor.step_end()
    dev.run(0.004)
    monitor.timer.poll()
    snap = monitor.steps.snapshot()
    assert int(snap["step_count"].sum()) == 3 and int(snap["step_hist"].sum()) == 0, snap["step_hist"].sum()


def test_the_sample_does_not_fall_into_step_with_a_periodic_workload():
    """A prefill chunk every 16th step: every 16th step timed would see all or none of them; the sampler sees its
    share (1/16 of the timed steps), and its gaps average N."""
    from moe_monitor.plugin.steps import PHASE_INDEX
    from moe_monitor.plugin.worker import StepSampler

    monitor, dev = sampled_monitor(every=16, seed=3)
    prefill, decode = step({"p": 64}, {}), step({}, {"a": (1, 5)})
    run_steps(monitor, dev, [prefill if i % 16 == 0 else decode for i in range(32000)])
    hist = monitor.steps.snapshot()["step_hist"]
    share = hist[PHASE_INDEX["prefill"]].sum() / hist.sum()
    assert 0.04 < share < 0.085, f"prefill steps are {share:.3f} of the timed ones (1/16 = 0.0625)"
    sampler = StepSampler(16, seed=1)
    gaps = [sampler.gap() for _ in range(100_000)]
    assert min(gaps) == 1 and abs(sum(gaps) / len(gaps) - 16) < 0.3
    assert {StepSampler(1).gap() for _ in range(100)} == {1}
    with pytest.raises(ValueError, match=">= 1"):
        StepSampler(0)


def test_a_vllm_that_fills_its_token_buffer_otherwise_sends_the_hooks_back_to_writing(caplog):
    """The count read from vLLM's buffer is checked against the scheduler's in the first steps; on a difference the
    gate closes and every later step's count is written by the hook (real CPU recorder, a stand-in buffer)."""
    import numpy as np
    import torch

    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.step_timer import HostTimer
    from moe_monitor.plugin.steps import StepStats
    from moe_monitor.plugin.worker import WorkerMonitor, vllm_step_tokens

    rec = Recorder(2, 4, 2, "cpu")
    runner = SimpleNamespace(query_start_loc=SimpleNamespace(gpu=torch.zeros(9, dtype=torch.int32),
                                                             np=np.zeros(9, dtype=np.int32)))
    device_count, host = vllm_step_tokens(runner, torch.device("cpu"))
    monitor = WorkerMonitor(rec, publisher=None, timer=HostTimer(StepStats()))
    monitor.read_vllm_step_tokens(device_count, host)
    ids = torch.tensor([[0, 1], [2, 3], [1, 1]])

    def run_step(tokens: int, vllm_says: int) -> None:
        monitor.step_begin(step({}, {"a": (tokens, 3)}))
        runner.query_start_loc.gpu[-1], host[-1] = vllm_says, vllm_says  # what vLLM's _prepare_inputs does
        rec.record(0, ids)
        monitor.step_end()

    run_step(3, 3)
    assert rec.host_counts()[0].tolist() == [1, 3, 1, 1] and monitor.vllm_tokens is not None
    with caplog.at_level("WARNING"):
        run_step(2, 3)  # vLLM's buffer disagrees with the scheduler: back to writing
    assert "write the count from now on" in caplog.text and monitor.vllm_tokens is None and int(rec.gate) == 0
    before = rec.host_counts()[0].copy()
    run_step(2, 3)  # written: 2 rows counted, whatever the buffer says
    assert (rec.host_counts()[0] - before).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("case", ["no buffer", "no tensors", "int64", "no requests", "no host copy"])
def test_a_runner_without_a_usable_token_buffer_keeps_the_written_count(case):
    import torch

    from moe_monitor.plugin.worker import vllm_step_tokens

    buffer = {"no buffer": None, "no tensors": SimpleNamespace(gpu=None, np=None),
              "int64": SimpleNamespace(gpu=torch.zeros(9, dtype=torch.int64), np=[0] * 9),
              "no requests": SimpleNamespace(gpu=torch.zeros(1, dtype=torch.int32), np=[0]),
              "no host copy": SimpleNamespace(gpu=torch.zeros(9, dtype=torch.int32), np=None)}[case]
    assert vllm_step_tokens(SimpleNamespace(query_start_loc=buffer), torch.device("cpu")) is None


def test_a_stalled_publisher_drops_the_oldest_steps_and_never_publishes_fewer_counted_than_timed(caplog):
    """The worker's deques are bounded: past `max_queued` steps between two publishes the oldest fall out (logged
    once, counted in `dropped`); a cell's count is raised to its timed steps so the segment stays consistent."""
    from moe_monitor.plugin.steps import PHASE_INDEX, StepStats

    steps = StepStats(max_queued=10)
    d, p = PHASE_INDEX["decode"], PHASE_INDEX["prefill"]
    with caplog.at_level("WARNING"):
        for _ in range(15):
            steps.step(d, 4)
        for _ in range(10):
            steps.step(p, 300)  # the deque now holds these ten only
        for _ in range(8):
            steps.record("decode", 4, 0.002)
        snap = steps.snapshot()
    assert steps.recorded == 25 and steps.dropped == 15
    assert int(snap["step_count"][p].sum()) == 10 and int(snap["step_hist"][d].sum()) == 8
    assert int(snap["step_count"][d].sum()) == 8, "fewer steps counted than timed"
    assert caplog.text.count("fell behind") == 1
    steps.step(d, 4)
    assert int(steps.snapshot()["step_count"][d].sum()) == 9 and steps.dropped == 15
