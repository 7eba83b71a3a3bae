"""The plugin's pieces on CPU torch: recorder gating, torch.compile, chaining with vLLM's router slot,
and the publisher surviving an unwritable segment directory.

Tests on vLLM's own classes import vLLM when they run (about 8 s on two cores), never at collection, and are
marked `slow` with torch.compile's: `make test` runs them, the fast loop does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moe_monitor.channel import LAYER_HOOKED, LAYER_UNOBSERVABLE, read_segment  # noqa: E402
from moe_monitor.plugin.recorder import Recorder  # noqa: E402


def reference(ids: torch.Tensor, valid: int, num_experts: int) -> np.ndarray:
    out = np.zeros(num_experts, dtype=np.int64)
    for e in ids[:valid].reshape(-1).tolist():
        if 0 <= e < num_experts:
            out[e] += 1
    return out


def test_counts_nothing_until_tokens_are_declared_valid():
    rec = Recorder(2, 8, 2, "cpu", capacity=16)
    rec.record(0, torch.randint(0, 8, (512, 2), dtype=torch.int32))  # a warm-up dummy run
    assert rec.host_counts().sum() == 0  # all 1024 assignments went to the sink column


def test_padded_rows_and_invalid_ids_are_not_counted():
    rec = Recorder(2, 8, 2, "cpu", capacity=4)  # grows past its initial capacity
    gen = torch.Generator().manual_seed(0)
    total = np.zeros((2, 8), dtype=np.int64)
    for valid, padded in [(3, 8), (17, 32), (1, 1), (100, 128)]:
        ids = torch.randint(0, 8, (padded, 2), generator=gen, dtype=torch.int32)
        ids[0, 0] = -1  # masked routing (e.g. EP-local ids) must not be counted
        rec.set_valid_tokens(valid)
        for row in (0, 1):
            rec.record(row, ids)
            total[row] += reference(ids, valid, 8)
    np.testing.assert_array_equal(rec.host_counts(), total)


@pytest.mark.slow  # torch.compile builds the graph: ~2.5 s on two cores
def test_same_counts_under_torch_compile():
    eager, compiled = Recorder(1, 16, 4, "cpu"), Recorder(1, 16, 4, "cpu")

    def layer(rec, logits):  # a router: softmax + top-k, then the tap
        ids = torch.topk(torch.softmax(logits, dim=-1), 4, dim=-1).indices
        rec.record(0, ids)
        return ids

    fn = torch.compile(lambda logits: layer(compiled, logits), dynamic=True)
    gen = torch.Generator().manual_seed(1)
    for valid, tokens in [(5, 8), (30, 32), (64, 64)]:
        logits = torch.randn(tokens, 16, generator=gen)
        for rec in (eager, compiled):
            rec.set_valid_tokens(valid)
        layer(eager, logits)
        fn(logits)
    assert eager.host_counts().sum() == (5 + 30 + 64) * 4
    assert torch.equal(eager.counts, compiled.counts)


def topk_router(**kwargs):
    """The smallest concrete vLLM router, top-k over the logits (the test is skipped without vLLM)."""
    base = pytest.importorskip("vllm.model_executor.layers.fused_moe.router.base_router")

    class TopKRouter(base.BaseRouter):
        @property
        def routing_method_type(self):
            from vllm.model_executor.layers.fused_moe.config import RoutingMethodType

            return RoutingMethodType.TopK

        def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
            weights, ids = torch.topk(router_logits, self.top_k, dim=-1)
            return weights, ids.to(torch.int32)

    return TopKRouter(**kwargs)


class FakeRunner:  # what attach.tap_layers needs of a MoERunner: its router
    def __init__(self, router):
        self.router = router


@pytest.mark.slow  # imports vLLM
@pytest.mark.parametrize("theirs_first", [True, False])
def test_tap_chains_an_existing_capture_fn_in_either_order(theirs_first):
    from moe_monitor.plugin.attach import Attachment, MoELayer, patch_set_capture_fn, tap_layers

    router = topk_router(top_k=2, global_num_experts=8)
    seen = []
    theirs = seen.append  # e.g. --enable-return-routed-experts' capturer
    if theirs_first:
        router.set_capture_fn(theirs)
    rec = Recorder(1, 8, 2, "cpu")
    patch_set_capture_fn()
    tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, FakeRunner(router), True)]), rec)
    if not theirs_first:
        router.set_capture_fn(theirs)  # binding later must not evict the tap
    rec.set_valid_tokens(4)
    logits = torch.randn(4, 8)
    _, ids = router._select_experts(torch.zeros(4, 16), logits)
    assert len(seen) == 1 and torch.equal(seen[0], ids)
    np.testing.assert_array_equal(rec.host_counts()[0], reference(ids, 4, 8))


def monolithic_runner(reports: bool, sink=None):
    """What attach needs of a MoERunner whose experts kernel is monolithic: the kernel behind its quant
    method (the test plugin's class, tests/fixtures/monolithic_plugin) and the RoutedExperts sink holder."""
    import types

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "monolithic_plugin"))
    try:
        from moe_monitor_test_monolithic import known_ids_experts
    finally:
        sys.path.pop(0)
    experts = known_ids_experts().__new__(known_ids_experts())  # its __init__ wants vLLM's full configs
    experts.supports_routing_replay_capture = (lambda: reports)
    experts.moe_config = types.SimpleNamespace(use_ep=False, ep_size=1, dp_size=1, max_num_tokens=16,
                                               experts_per_token=2, device="cpu")
    quant = types.SimpleNamespace(is_monolithic=True, moe_kernel=types.SimpleNamespace(
        impl=types.SimpleNamespace(fused_experts=experts)))
    holder = torch.nn.Module()
    holder.routing_sink = sink
    runner = torch.nn.Module()
    runner._quant_method, runner.routed_experts = quant, holder
    return runner


def vllm_sinks():
    """vLLM's routed-experts sinks module (vLLM >= 0.32); the test is skipped on a vLLM without sinks (0.27-0.31
    have the module but not RoutedExpertsSink: scripts/vllm-matrix)."""
    sinks = pytest.importorskip("vllm.model_executor.layers.fused_moe.routed_experts_capturer")
    if not hasattr(sinks, "RoutedExpertsSink"):
        pytest.skip("this vLLM has no routed-experts sinks (>= 0.32)")
    return sinks


def kernel_writes(sink, ids: torch.Tensor) -> None:
    """What vLLM's FusedMoEKernelMonolithicImpl.apply does with a sink around the kernel call."""
    out = sink.buffer[: ids.shape[0]]
    out.copy_(ids)  # the kernel's routing_replay_out
    sink.capture_fn(out)


@pytest.mark.slow  # imports vLLM
@pytest.mark.parametrize("theirs_first", [True, False])
def test_a_monolithic_layer_is_counted_through_the_routed_experts_sink_beside_another_user(theirs_first):
    sinks = vllm_sinks()
    from moe_monitor.plugin.attach import Attachment, MoELayer, retap_sinks, sink_unusable, tap_layers

    seen = []
    runner = monolithic_runner(True)
    cfg = runner._quant_method.moe_kernel.impl.fused_experts.moe_config
    if theirs_first:  # e.g. vLLM's capturer bound before moe-monitor attached
        runner.routed_experts.routing_sink = sinks.RoutedExpertsSink(cfg, seen.append)
    assert sink_unusable(runner) == ""
    rec = Recorder(1, 8, 2, "cpu", id_dtypes=(torch.int32, torch.int64, torch.int16))
    tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, runner, True, via="sink")]), rec)
    tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, runner, True, via="sink")]), rec)
    if not theirs_first:  # vLLM's bind_routed_experts_capturer gives the layer a new sink; our patch re-taps
        runner.routed_experts.routing_sink = sinks.RoutedExpertsSink(cfg, seen.append)
        retap_sinks(runner)
    sink = runner.routed_experts.routing_sink
    assert sink.buffer.dtype == torch.int16
    rec.set_valid_tokens(3)
    ids = torch.tensor([[1, 2], [2, 7], [1, 0], [5, 5]], dtype=torch.int16)  # the 4th row is padding
    kernel_writes(sink, ids)
    assert len(seen) == 1 and torch.equal(seen[0], ids), "the other user still gets every id, once"
    np.testing.assert_array_equal(rec.host_counts()[0], reference(ids, 3, 8))


@pytest.mark.slow  # imports vLLM
def test_a_monolithic_layer_is_created_a_sink_when_nobody_else_asked_for_one():
    sinks = vllm_sinks()
    from moe_monitor.plugin.attach import Attachment, MoELayer, tap_layers

    runner = monolithic_runner(True)
    rec = Recorder(1, 8, 2, "cpu")
    tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, runner, True, via="sink")]), rec)
    sink = runner.routed_experts.routing_sink
    assert isinstance(sink, sinks.RoutedExpertsSink) and tuple(sink.buffer.shape) == (16, 2)
    rec.set_valid_tokens(2)
    kernel_writes(sink, torch.tensor([[3, 4], [4, 6]], dtype=torch.int16))
    assert rec.host_counts()[0].tolist() == [0, 0, 0, 1, 2, 0, 1, 0]


@pytest.mark.slow  # imports vLLM
def test_monolithic_kernels_that_do_not_report_their_routing_stay_unobservable():
    vllm_sinks()
    import types

    from moe_monitor.plugin.attach import sink_unusable

    assert "does not report its routing" in sink_unusable(monolithic_runner(False))
    foreign = monolithic_runner(True)
    foreign._quant_method.moe_kernel.impl.fused_experts = types.SimpleNamespace()  # not FusedMoEExpertsMonolithic
    assert "exposes no routed-experts sink" in sink_unusable(foreign)


def test_a_cpu_experts_kernel_that_routes_itself_is_tapped_at_its_select_experts():
    """vLLM 0.28-0.29 on CPU: the CPU experts kernel is monolithic and routes in its own `_select_experts` (no
    router runs, no routed-experts sink): the tap wraps that method of each layer's kernel, once, and passes
    the kernel's result through unchanged (scripts/vllm-matrix runs the real one; 0.27's kernel below)."""
    import types

    from moe_monitor.plugin.attach import Attachment, MoELayer, selects_experts, tap_layers

    class CpuExperts:  # the shape of vLLM 0.28's CPUUnquantizedExperts._select_experts
        def _select_experts(self, hidden_states, router_logits, num_expert_group, topk_group, bias, scaling):
            weights, ids = torch.topk(torch.softmax(router_logits, dim=-1), 2, dim=-1)
            return weights, ids.to(torch.int32)

    experts = CpuExperts()
    runner = types.SimpleNamespace(_quant_method=types.SimpleNamespace(
        is_monolithic=True, moe_kernel=types.SimpleNamespace(impl=types.SimpleNamespace(fused_experts=experts))))
    assert selects_experts(runner)
    assert not selects_experts(types.SimpleNamespace(_quant_method=None))
    rec = Recorder(1, 8, 2, "cpu")
    for _ in range(2):  # the plugin attached twice: tapped once
        tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, runner, True, via="experts")]), rec)
    rec.set_valid_tokens(3)
    logits = torch.randn(4, 8)
    weights, ids = experts._select_experts(torch.zeros(4, 16), logits, None, None, None, None)
    assert torch.equal(ids, CpuExperts()._select_experts(None, logits, None, None, None, None)[1])
    np.testing.assert_array_equal(rec.host_counts()[0], reference(ids, 3, 8))


def test_vllm_027s_cpu_kernel_is_tapped_where_it_hands_the_ids_to_its_forward_method():
    """vLLM 0.27 on CPU: the quant method's `cpu_fused_moe` (CPUFusedMOE) routes with a module function, then
    calls its per-instance `forward_method(layer, x, topk_weights, topk_ids, ...)`: the tap wraps that."""
    import types

    from moe_monitor.plugin.attach import Attachment, MoELayer, selects_experts, tap_layers

    class CPUFusedMOE:  # the shape of vLLM 0.27's
        def __init__(self):
            self.forward_method = self.forward_torch

        def forward_torch(self, layer, x, topk_weights, topk_ids, activation, num_experts, on_input):
            return x * 2

        def __call__(self, layer, x, router_logits):
            weights, ids = torch.topk(router_logits, 2, dim=-1)
            return self.forward_method(layer, x, weights, ids.to(torch.int32), "silu", 8, False)

    kernel = CPUFusedMOE()
    runner = types.SimpleNamespace(_quant_method=types.SimpleNamespace(is_monolithic=True, moe_kernel=None,
                                                                       cpu_fused_moe=kernel))
    assert selects_experts(runner)
    rec = Recorder(1, 8, 2, "cpu")
    for _ in range(2):  # the plugin attached twice: tapped once
        tap_layers(Attachment([MoELayer(0, "model.layers.0.mlp.experts", 8, 2, runner, True, via="experts")]), rec)
    rec.set_valid_tokens(4)
    logits, x = torch.randn(4, 8), torch.ones(4, 16)
    assert torch.equal(kernel(None, x, logits), x * 2)
    ids = torch.topk(logits, 2, dim=-1).indices
    np.testing.assert_array_equal(rec.host_counts()[0], reference(ids, 4, 8))


def test_publisher_survives_unwritable_directory_and_recovers(tmp_path):
    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.steps import StepStats

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the segment directory should be")
    rec, steps = Recorder(2, 8, 2, "cpu"), StepStats()
    layers = Attachment([MoELayer(0, "a", 8, 2, None, True), MoELayer(1, "b", 8, 2, None, False)])
    shape = Shape(2, 8, len(steps.token_bounds), len(steps.duration_bounds))
    writer = SegmentWriter(str(blocker / "segments"), "m", Ranks(), shape, 2)
    pub = Publisher(writer, rec, steps, layers, interval_s=60)
    assert pub.publish_once() is False and pub.publish_once() is False
    assert pub.errors == 2
    blocker.unlink()  # the operator fixes the volume: the next tick publishes, errors included
    rec.set_valid_tokens(1)
    rec.record(0, torch.tensor([[1, 2]]))
    steps.record_step("prefill", 1, 0.01)
    assert pub.publish_once() is True
    snap = read_segment(writer.path)
    assert snap.header.publish_errors == 2
    assert snap.counts[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert snap.layer_flags.tolist() == [LAYER_HOOKED, LAYER_UNOBSERVABLE]


def test_hooked_layer_whose_router_never_ran_is_flagged_after_the_first_step(tmp_path):
    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.steps import StepStats

    rec, steps = Recorder(2, 8, 2, "cpu"), StepStats()
    layers = Attachment([MoELayer(0, "a", 8, 2, None, True), MoELayer(1, "b", 8, 2, None, True)])
    pub = Publisher(SegmentWriter(str(tmp_path), "m", Ranks(), Shape(2, 8, 8, 16), 2), rec, steps, layers, 60)
    rec.record(0, torch.tensor([[1, 2]]))  # layer 1's router is bypassed by a fused kernel
    assert pub.layer_flags(stepped=False).tolist() == [LAYER_HOOKED, LAYER_HOOKED]
    assert pub.layer_flags(stepped=True).tolist() == [LAYER_HOOKED, LAYER_HOOKED | LAYER_UNOBSERVABLE]


def test_cuda_only_recorders_are_refused_on_cpu():
    for mode in ("fused", "staged"):
        with pytest.raises(ValueError, match=f"the {mode} recorder does not run on cpu"):
            Recorder(2, 8, 2, "cpu", mode=mode)
    with pytest.raises(ValueError, match="not one of"):
        Recorder(2, 8, 2, "cpu", mode="fast")


def test_supported_vllm_versions_and_missing_internals():
    from moe_monitor.plugin.compat import missing_internals, support

    assert support("0.26.0", []) == (True, "")
    assert support("0.32.0+cpu", []) == (True, "")
    usable, line = support("0.40.1", [])
    assert usable and "outside the tested range" in line and "0.26 to 0.32" in line
    usable, line = support("0.26.0", ["vllm.x:Worker.sample_tokens"])
    assert not usable and "does not support vLLM 0.26.0" in line and "vllm.x:Worker.sample_tokens" in line
    assert missing_internals({"json": ("dumps", "JSONDecoder.decode", "nope")}) == ["json:nope"]
    assert missing_internals({"no_such_module_here": ("x",)})[0].startswith("no_such_module_here (")


@pytest.mark.slow  # imports vLLM
def test_the_installed_vllm_has_every_internal_the_plugin_uses():
    from moe_monitor.plugin.compat import missing_internals

    assert missing_internals() == [], "the installed vLLM must have every internal the plugin uses"


def test_host_timer_records_phase_tokens_and_duration():
    from moe_monitor.plugin.step_timer import HostTimer
    from moe_monitor.plugin.steps import PHASE_INDEX, StepStats

    steps = StepStats()
    timer = HostTimer(steps)
    timer.end()  # no open step: nothing
    timer.begin("mixed", 40)
    timer.end()
    timer.begin("decode", 3)
    timer.cancel()  # an empty step: nothing
    timer.end()
    snap = steps.snapshot()
    mixed = PHASE_INDEX["mixed"]
    assert snap["step_hist"].sum() == 1 and snap["step_hist"][mixed][steps.token_bounds.searchsorted(40)].sum() == 1
    assert snap["step_seconds"][mixed].sum() > 0  # the timer times; counting every step is the hooks' (step())


def test_a_tap_whose_recording_fails_never_raises_into_the_forward_pass(caplog):
    """The router's capture slot runs inside vLLM's forward: a recording error is logged once, recording stops
    for every layer, and the capture function chained behind ours still gets every call."""
    from moe_monitor.plugin.attach import Tap

    rec = Recorder(2, 8, 2, "cpu", capacity=16)
    chained = []
    taps = [Tap(rec, row, chained.append) for row in range(2)]
    rec.set_valid_tokens(3)
    taps[0](torch.tensor([[1, 2], [1, 3], [4, 5]]))
    bad = torch.tensor([[1, 2]]).to("meta")  # ids on another device than the counters: the count raises
    with caplog.at_level("ERROR"):
        taps[1](bad)
        taps[1](bad)
        taps[0](torch.tensor([[7, 7], [7, 7], [7, 7]]))
    assert len(chained) == 4 and chained[1] is bad
    assert rec.failed
    assert sum("stops counting" in r.getMessage() for r in caplog.records) == 1
    assert int(rec.counts[:, 7].sum()) == 0, "nothing is recorded after the failure"


@pytest.mark.slow  # imports vLLM
def test_the_plugin_follows_vllms_eplb_commits_without_touching_the_device():
    """vLLM's own commit functions (sync: all layers; async: one layer) applied to a model state: the host copy
    the publisher writes follows both, and a state of another model (a drafter) is ignored."""
    es = pytest.importorskip("vllm.distributed.eplb.eplb_state")
    import types

    from moe_monitor.plugin.placement import LivePlacement, follow_commits

    def state(p2l):
        p2l = torch.tensor(p2l)
        E = int(p2l.max()) + 1
        return types.SimpleNamespace(physical_to_logical_map=p2l.clone(), physical_to_logical_map_buffer=p2l.clone(),
                                     logical_to_physical_map=torch.full((p2l.shape[0], E, 3), -1),
                                     logical_replica_count=torch.zeros(p2l.shape[0], E, dtype=torch.long))

    initial = [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 3]]
    mine, drafter = state(initial), state(initial)
    routed = {"counts": np.zeros((2, 4), dtype=np.int64)}  # the recorder's host counts [L, E]
    live = LivePlacement(mine, mine.physical_to_logical_map.numpy(), 2, lambda: routed["counts"])
    follow_commits(live)
    follow_commits(live)  # idempotent: wrapped once
    es._commit_eplb_maps(mine, torch.tensor([[3, 2, 1, 0, 3, 3], [1, 0, 3, 2, 1, 1]]))
    assert live.current.tolist() == [[3, 2, 1, 0, 3, 3], [1, 0, 3, 2, 1, 1]]
    assert mine.physical_to_logical_map.tolist() == live.current.tolist(), "vLLM's own commit still happened"
    before = live.current
    es._commit_eplb_maps_for_layer(mine, torch.tensor([0, 0, 1, 2, 3, 0]), layer=1)
    assert live.current.tolist() == [[3, 2, 1, 0, 3, 3], [0, 0, 1, 2, 3, 0]]
    assert before.tolist()[1] == [1, 0, 3, 2, 1, 1], "a snapshot the publisher holds is never written in place"
    es._commit_eplb_maps(drafter, torch.tensor(initial[::-1]))
    assert live.current.tolist()[1] == [0, 0, 1, 2, 3, 0] and live.changes == 2


@pytest.mark.slow  # imports vLLM
def test_attach_helpers_leave_a_vllm_without_routed_experts_sinks_alone(monkeypatch):
    """vLLM 0.26 has routed_experts_capturer but neither bind_routed_experts_capturer nor RoutedExpertsSink (an
    AttributeError here once failed the whole attach on the GPU)."""
    rec = pytest.importorskip("vllm.model_executor.layers.fused_moe.routed_experts_capturer")
    from moe_monitor.plugin.attach import patch_bind_routed_experts_capturer, sink_unusable

    monkeypatch.delattr(rec, "bind_routed_experts_capturer", raising=False)  # 0.27-0.31 lack them already
    monkeypatch.delattr(rec, "RoutedExpertsSink", raising=False)
    patch_bind_routed_experts_capturer()  # no error, nothing to wrap
    assert "has no routed-experts sink" in sink_unusable(monolithic_runner(True))


def test_the_plugin_attributes_each_placements_tokens_to_the_ranks_that_served_them():
    """Epochs: what was routed before a commit stays with the placement that served it; after the commit, new
    tokens go by the new one. A per-layer (async EPLB) commit closes only that layer's epoch."""
    from moe_monitor.plugin.placement import LivePlacement

    counts = np.zeros((2, 4), dtype=np.int64)
    live = LivePlacement(None, np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]), 2, lambda: counts.copy())
    # ranks hold slots [0:3] and [3:6]: layer rows 0, 1, 2 | 3, 0, 1 (experts 0 and 1 replicated on both)
    counts[:] = [[10, 4, 6, 2], [0, 0, 0, 8]]
    assert live.rank_load().tolist() == [[5 + 2 + 6, 5 + 2 + 2], [0, 8]]
    live.commit(np.array([[3, 3, 3, 0, 1, 2], [2, 2, 2, 0, 1, 3]]))  # expert 3 all on rank 0 now, ...
    counts += [[0, 0, 0, 9], [1, 1, 1, 1]]
    assert live.rank_load().tolist() == [[13 + 9, 9], [0 + 1, 8 + 1 + 1 + 1]]
    live.commit(np.array([0, 1, 3, 2, 2, 2]), layer=1)  # async: layer 1 alone
    counts += [[0, 0, 0, 1], [0, 0, 4, 0]]
    load = live.rank_load()
    assert load[0].tolist() == [13 + 10, 9] and load[1].tolist() == [1, 11 + 4]
    assert live.changes == 2 and live.current[1].tolist() == [0, 1, 3, 2, 2, 2]
