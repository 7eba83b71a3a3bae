"""Recorder correctness on a GPU under CUDA graphs. Skipped without CUDA; run on the device machine by
`python tests/test_recorder_gpu.py` (no pytest needed there) in the same call as the benchmark."""

from __future__ import annotations

import os
import sys

try:
    import pytest
except ImportError:  # the device machine has no pytest: __main__ below runs the checks
    pytest = None

if pytest is not None:
    torch = pytest.importorskip("torch")
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
else:
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from moe_monitor.plugin.recorder import MODES, Recorder  # noqa: E402

SMALL = dict(name="small", layers=6, experts=64, local_experts=16, top_k=4, hidden=256, intermediate=128)


def _stack():
    from moe_stack import MoEShape, MoEStack

    return MoEStack(MoEShape(**SMALL))


def _recorder(stack, mode, capacity=64):
    s = stack.shape
    rec = Recorder(s.layers, s.experts, s.top_k, "cuda", capacity=capacity, mode=mode)
    rec.set_rows(list(range(s.layers)))
    return rec


def check_graph_replays_count_exactly_the_valid_tokens(mode):
    """A graph captured at 32 padded tokens, replayed with 32, 17, 1 and 0 real tokens."""
    from moe_stack import capture

    stack = _stack()
    rec = _recorder(stack, mode)
    x = torch.randn(32, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    rec.set_valid_tokens(0)
    graph, _ = capture(lambda x: stack.step(x, tap=rec.record), x)
    assert rec.counts[:, :SMALL["experts"]].sum().item() == 0, "warm-up and capture must count nothing"
    expected = torch.zeros(SMALL["layers"], SMALL["experts"], dtype=torch.int64)
    for valid, replays in [(32, 3), (17, 2), (1, 4), (0, 2)]:
        rec.set_valid_tokens(valid)
        for _ in range(replays):
            graph.replay()
        expected += replays * stack.reference_counts(x, valid)
    torch.cuda.synchronize()
    got = rec.counts[:, :SMALL["experts"]].cpu()
    assert torch.equal(got, expected), (mode, got.sum().item(), expected.sum().item())


def check_eager_step_never_syncs_with_the_host(mode):
    stack = _stack()
    rec = _recorder(stack, mode)
    x = torch.randn(8, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    stack.step(x, tap=rec.record)  # first call compiles the Triton kernel (may sync): not the steady state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rec.set_valid_tokens(8)
        for _ in range(3):
            for row in range(SMALL["layers"]):
                rec.record(row, stack.route(x)[1])
        rec.set_valid_tokens(0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert rec.counts[:, :SMALL["experts"]].sum().item() == 3 * SMALL["layers"] * 8 * SMALL["top_k"]


def check_publisher_copy_does_not_wait_for_the_compute_stream(mode):
    """host_counts on a side stream while a long kernel runs on the compute stream returns promptly."""
    stack = _stack()
    rec = _recorder(stack, mode)
    host = torch.empty(SMALL["layers"], SMALL["experts"], dtype=torch.int64, pin_memory=True)
    side = torch.cuda.Stream()
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    busy = torch.cuda.Event(enable_timing=True)
    done = torch.cuda.Event(enable_timing=True)
    for _ in range(40):
        big = big @ big.T / 8192  # ~50 ms of work queued on the compute stream
    busy.record()
    rec.host_counts(host, side)
    side.synchronize()
    assert not busy.query(), "the snapshot copy waited for the compute stream"
    done.record()
    torch.cuda.synchronize()


if pytest is not None:
    @pytest.mark.parametrize("mode", MODES)
    def test_graph_replays_count_exactly_the_valid_tokens(mode):
        check_graph_replays_count_exactly_the_valid_tokens(mode)

    @pytest.mark.parametrize("mode", MODES)
    def test_eager_step_never_syncs_with_the_host(mode):
        check_eager_step_never_syncs_with_the_host(mode)

    def test_publisher_copy_does_not_wait_for_the_compute_stream():
        check_publisher_copy_does_not_wait_for_the_compute_stream("fused")


if __name__ == "__main__":
    failures = 0
    for check in (check_graph_replays_count_exactly_the_valid_tokens, check_eager_step_never_syncs_with_the_host,
                  check_publisher_copy_does_not_wait_for_the_compute_stream):
        for mode in MODES:
            try:
                check(mode)
                print(f"PASS {check.__name__}[{mode}]", flush=True)
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL {check.__name__}[{mode}]: {type(e).__name__}: {e}", flush=True)
    sys.exit(1 if failures else 0)
