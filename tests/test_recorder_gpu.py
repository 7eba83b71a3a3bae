"""Recorder, publisher and step timer on a GPU under CUDA graphs. Skipped without CUDA; run on the device
machine (docs/install.md, "GPU tests")."""

from __future__ import annotations

import os
import sys
import threading

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from moe_monitor.plugin.recorder import CUDA_MODES, Recorder  # noqa: E402

SMALL = dict(name="small", layers=6, experts=64, local_experts=16, top_k=4, hidden=256, intermediate=128)


def _stack():
    from moe_stack import MoEShape, MoEStack

    return MoEStack(MoEShape(**SMALL))


def _recorder(stack, mode, capacity=64, id_dtypes=(torch.int32, torch.int64)):
    s = stack.shape
    rec = Recorder(s.layers, s.experts, s.top_k, "cuda", capacity=capacity, mode=mode, id_dtypes=id_dtypes)
    rec.set_rows(list(range(s.layers)))
    # Every check runs the path the plugin uses on this machine: the driver's stream write for the token count.
    assert rec.driver is not None, "the driver's calls must be usable on the GPU machine"
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
    # the host mirror the publisher reads holds the same counts, written by the kernel itself
    assert (rec.host_counts() == expected.numpy()).all(), mode


def check_graphs_sharing_one_pool_count_their_own_ids(mode):
    """vLLM captures a graph per batch size, largest first, all in one memory pool: what one capture frees, the
    next reuses. The recorder holds a step's ids only until its flush (inside the capture), so a later capture
    may place its own tensors where an earlier graph's ids were: each replay must still count its own ids."""
    from moe_stack import capture

    stack = _stack()
    rec = _recorder(stack, mode)
    rec.set_valid_tokens(0)
    big = torch.randn(32, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    g_big, _ = capture(lambda x: stack.step(x, tap=rec.record), big)
    small = torch.randn(8, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    g_small, _ = capture(lambda x: stack.step(x, tap=rec.record), small, pool=g_big.pool())
    expected = torch.zeros(SMALL["layers"], SMALL["experts"], dtype=torch.int64)
    for graph, x, valid in [(g_big, big, 32), (g_small, small, 8), (g_big, big, 20), (g_small, small, 5),
                            (g_small, small, 8), (g_big, big, 32)]:
        rec.set_valid_tokens(valid)
        graph.replay()
        expected += stack.reference_counts(x, valid)
    rec.set_valid_tokens(0)
    torch.cuda.synchronize()
    got = rec.counts[:, :SMALL["experts"]].cpu()
    assert torch.equal(got, expected), (mode, got.sum().item(), expected.sum().item())


def check_sink_ids_count_exactly_under_graphs(mode):
    """Layers counted through vLLM's routed-experts sink: the kernel writes int16 ids into the leading rows
    of a persistent per-layer buffer ([max tokens, k], allocated before capture) and the tap gets that view."""
    from moe_stack import capture

    stack = _stack()
    rec = _recorder(stack, mode, id_dtypes=(torch.int32, torch.int64, torch.int16))
    sinks = [torch.full((64, SMALL["top_k"]), -1, dtype=torch.int16, device="cuda") for _ in range(SMALL["layers"])]

    def sink_tap(row, ids):  # what FusedMoEKernelMonolithicImpl.apply does: the kernel writes, then capture_fn
        out = sinks[row][: ids.shape[0]]
        out.copy_(ids)
        rec.record(row, out)

    x = torch.randn(32, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    rec.set_valid_tokens(0)
    graph, _ = capture(lambda x: stack.step(x, tap=sink_tap), x)
    expected = torch.zeros(SMALL["layers"], SMALL["experts"], dtype=torch.int64)
    for valid in (32, 17, 1, 0, 32):
        rec.set_valid_tokens(valid)
        graph.replay()
        expected += stack.reference_counts(x, valid)
    rec.set_valid_tokens(0)
    torch.cuda.synchronize()
    assert torch.equal(rec.counts[:, :SMALL["experts"]].cpu(), expected), mode
    assert (rec.host_counts() == expected.numpy()).all(), mode


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


def check_a_step_that_never_reaches_the_last_layer_is_counted_at_the_next_boundary(mode):
    """A step that stops before the last tapped layer (an exception, a bypassed layer) still counts."""
    stack = _stack()
    rec = _recorder(stack, mode)
    x = torch.randn(8, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    ids = stack.route(x)[1]
    rec.set_valid_tokens(8)
    for row in range(SMALL["layers"] - 1):
        rec.record(row, ids)
    rec.set_valid_tokens(0)  # the boundary flushes what the cut-short step had
    torch.cuda.synchronize()
    per_layer = rec.host_counts().sum(axis=1)
    assert per_layer[:-1].tolist() == [8 * SMALL["top_k"]] * (SMALL["layers"] - 1) and per_layer[-1] == 0, per_layer


def check_no_kernel_compiles_after_the_recorder_is_built(mode):
    """Every Triton variant is compiled at attach time: steps of any size, with router ids (int32/int64) or
    sink ids (int16), compile nothing (vLLM's JIT monitor would otherwise warn during inference and the step
    would stall)."""
    import triton

    compiled = []
    previous = triton.knobs.runtime.jit_post_compile_hook
    dtypes = (torch.int32, torch.int64, torch.int16)
    rec = _recorder(_stack(), mode, capacity=4096, id_dtypes=dtypes)
    triton.knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(getattr(kw.get("fn"), "name", "?"))
    try:
        for dtype in dtypes:
            for tokens in (0, 1, 3, 17, 37, 100, 500, 1500, 4096):
                rec.set_valid_tokens(tokens)
                ids = torch.randint(0, SMALL["experts"], (tokens, SMALL["top_k"]), device="cuda", dtype=dtype)
                for row in range(SMALL["layers"]):
                    rec.record(row, ids)
        rec.set_valid_tokens(0)
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], compiled


def check_graph_replays_count_what_vllms_buffer_says(mode):
    """The plugin's default on vLLM: a graph captured at 32 padded tokens reads the step's count from an int32
    buffer the host fills before each replay (as vLLM's query_start_loc: a non-blocking copy from pinned memory);
    nothing is written a step; the gate closed (a dummy run) counts nothing, opened again counts again."""
    from moe_stack import capture

    stack = _stack()
    rec = _recorder(stack, mode)
    device = torch.zeros(9, dtype=torch.int32, device="cuda")
    sources = []  # one pinned source per copy, kept until the end: a copy may run after the host moved on
    rec.read_step_tokens_from(device[-1])
    rec.set_gate(False)
    x = torch.randn(32, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    graph, _ = capture(lambda x: stack.step(x, tap=rec.record), x)
    rec.set_gate(True)
    assert rec.counts[:, :SMALL["experts"]].sum().item() == 0, "warm-up and capture must count nothing"
    expected = torch.zeros(SMALL["layers"], SMALL["experts"], dtype=torch.int64)
    for valid, replays, gate in [(32, 3, True), (17, 2, True), (9, 2, False), (1, 4, True), (0, 2, True)]:
        sources.append(torch.full((9,), valid, dtype=torch.int32).pin_memory())
        device.copy_(sources[-1], non_blocking=True)  # what vLLM's copy_to_gpu does before each forward
        rec.set_gate(gate)
        for _ in range(replays):
            graph.replay()
        rec.set_gate(True)
        if gate:
            expected += replays * stack.reference_counts(x, valid)
    torch.cuda.synchronize()
    got = rec.counts[:, :SMALL["experts"]].cpu()
    assert torch.equal(got, expected), (mode, got.sum().item(), expected.sum().item())
    assert (rec.host_counts() == expected.numpy()).all(), mode


CHECKS = (check_graph_replays_count_exactly_the_valid_tokens, check_graph_replays_count_what_vllms_buffer_says,
          check_graphs_sharing_one_pool_count_their_own_ids,
          check_sink_ids_count_exactly_under_graphs,
          check_eager_step_never_syncs_with_the_host,
          check_a_step_that_never_reaches_the_last_layer_is_counted_at_the_next_boundary,
          check_no_kernel_compiles_after_the_recorder_is_built)


@pytest.mark.parametrize("mode", CUDA_MODES)
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[6:])
def test_recorder(check, mode):
    check(mode)


def _capture_while(hammer, captures: int = 60) -> tuple[int, str]:
    """Capture `captures` CUDA graphs of a recorded MoE step in global mode (as vLLM does) while `hammer`
    runs in another thread. Returns (captures that succeeded, first error)."""
    from moe_stack import capture

    stack = _stack()
    rec = _recorder(stack, "fused")
    x = torch.randn(16, SMALL["hidden"], device="cuda", dtype=torch.bfloat16)
    stop = threading.Event()
    thread = threading.Thread(target=hammer, args=(stop,), daemon=True)
    thread.start()
    ok, first_error = 0, ""
    try:
        for _ in range(captures):
            try:
                graph, _ = capture(lambda x: stack.step(x, tap=rec.record), x)
                rec.set_valid_tokens(16)
                graph.replay()
                rec.set_valid_tokens(0)
                torch.cuda.synchronize()
                ok += 1
            except Exception as e:  # noqa: BLE001 - counted
                first_error = first_error or f"{type(e).__name__}: {str(e)[:200]}"
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    pass
    finally:
        stop.set()
        thread.join(10)
    return ok, first_error


def test_publisher_thread_never_breaks_a_global_mode_capture(tmp_path):
    """The real Publisher, publishing every millisecond from its own thread, while graphs are captured in
    global mode: every capture succeeds. Control: a thread that only queries a CUDA event breaks them."""
    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.steps import StepStats

    rec = Recorder(SMALL["layers"], SMALL["experts"], SMALL["top_k"], "cuda")  # built on this thread, as vLLM's
    steps = StepStats()
    layers = Attachment([MoELayer(i, f"l{i}", SMALL["experts"], SMALL["top_k"], None, True)
                         for i in range(SMALL["layers"])])
    shape = Shape(SMALL["layers"], SMALL["experts"], len(steps.token_bounds), len(steps.duration_bounds))
    pub = Publisher(SegmentWriter(str(tmp_path), "m", Ranks(), shape, SMALL["top_k"]), rec, steps, layers, 0.001)
    published = []

    def publisher_hammer(stop):
        while not stop.is_set():
            published.append(pub.publish_once())

    ok, error = _capture_while(publisher_hammer)
    assert ok == 60 and not error, (ok, error)
    assert published.count(True) > 100 and False not in published, (len(published), pub.errors)

    def event_query_hammer(stop):
        ev = torch.cuda.Event()
        ev.record(torch.cuda.Stream())
        while not stop.is_set():
            ev.query()

    survived, broken = _capture_while(event_query_hammer, captures=10)
    print(f"control: {survived}/10 captures survived a thread querying a CUDA event ({broken})")
    assert survived < 10, "the control must break captures, or this test could not see a publisher that does"


@pytest.mark.parametrize("events", ["driver", "torch"])
def test_step_timer_measures_device_time_without_syncing(events):
    """The CUDA timer reports the device time of a step (a known sleep kernel), not the host's launch time,
    and never synchronises: with the driver's events (the default) and torch's (the fallback)."""
    from moe_monitor.plugin import cuda_driver
    from moe_monitor.plugin.step_timer import CudaEventTimer, DriverEvents, TorchEvents
    from moe_monitor.plugin.steps import StepStats

    steps = StepStats()
    if events == "driver":
        driver = cuda_driver.load(torch.device("cuda", 0))
        assert driver is not None, "the driver's calls must be usable on the GPU machine"
        backend = DriverEvents(*driver)
    else:
        backend = TorchEvents()
    timer = CudaEventTimer(steps, backend)
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1000 * 0.02)  # ~20 ms at the base clock
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            timer.begin("decode", 8)
            torch.cuda._sleep(cycles)
            timer.end()
        timer.begin("decode", 8)  # the next step boundary resolves what completed
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    timer.cancel()
    timer.poll()
    snap = steps.snapshot()
    n, seconds = int(snap["step_hist"].sum()), float(snap["step_seconds"].sum())
    print(f"step timer ({events}): {n} steps, mean {seconds / max(n, 1) * 1e3:.2f} ms for a ~20 ms sleep kernel")
    assert n == 5 and 0.005 < seconds / n < 0.2, (n, seconds)
