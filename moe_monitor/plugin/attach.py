"""Find a vLLM model's MoE layers and tap their routing, chaining any capture function already there.

Two places give a layer's routing decisions ([T, k] expert ids):
- the router's capture slot (`BaseRouter.capture_fn`), for layers whose experts kernel takes ids from
  vLLM's router (the modular kernels: Triton, CUTLASS, the CPU kernels...);
- the routed-experts sink (`RoutedExperts.routing_sink`, vLLM >= 0.32), for monolithic kernels that route
  inside the kernel (FlashInfer TRT-LLM MoE, gpt-oss MXFP4) and write the ids they chose into the sink's
  buffer when `supports_routing_replay_capture()`. vLLM calls the sink's `capture_fn` after the kernel, in
  the same forward pass (graph-safe like the router's slot). Monolithic kernels without that support stay
  unobservable and are reported as such;
- on vLLM 0.27-0.29 CPU, the CPU experts kernel is monolithic and routes by itself, one kernel object per
  layer: the tap wraps the method of the layer's kernel that hands the ids out (`kernel_routing`).
In every place a `Tap` records, then calls whoever else was there (vLLM's `--enable-return-routed-experts`
capturer binds after the model is loaded: the patches below keep our tap first and chain theirs behind).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .recorder import Recorder

log = logging.getLogger(__name__)


class Tap:
    """Occupies a router's single capture slot: records, then calls whoever else wants the ids."""

    def __init__(self, recorder: Recorder, row: int, chained: Callable[[torch.Tensor], None] | None):
        self.recorder, self.row, self.chained = recorder, row, chained

    def __call__(self, topk_ids: torch.Tensor) -> None:
        # Inside vLLM's forward pass: our failure must never become vLLM's. The first one is logged (ERROR,
        # so it reaches vLLM's log) and recording stops for every layer (partial counts would mislead);
        # whoever is chained behind us is still called, and their errors stay theirs.
        if not self.recorder.failed:
            try:
                self.recorder.record(self.row, topk_ids)
            except Exception:  # noqa: BLE001
                self.recorder.failed = True
                log.exception("moe-monitor: recording layer row %d failed; moe-monitor stops counting routed "
                              "tokens in this worker (vLLM is unaffected)", self.row)
        if self.chained is not None:
            self.chained(topk_ids)


@dataclass
class MoELayer:
    layer_id: int
    name: str
    num_experts: int
    top_k: int
    module: object
    observable: bool
    why_not: str = ""
    via: str = "router"  # where the ids come from when observable: "router", "sink" or "experts"


@dataclass
class Attachment:
    layers: list[MoELayer] = field(default_factory=list)

    @property
    def observable(self) -> list[MoELayer]:
        return [x for x in self.layers if x.observable]


def find_moe_layers(model: torch.nn.Module) -> Attachment:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    found: dict[int, MoELayer] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoERunner) or module.layer_id in found:
            continue
        cfg = module.moe_config
        layer = MoELayer(module.layer_id, name, cfg.num_logical_experts, cfg.experts_per_token, module, True)
        quant = getattr(module, "_quant_method", None)
        if getattr(quant, "is_monolithic", False):
            why_not = sink_unusable(module)
            if not why_not:
                layer.via = "sink"
            elif selects_experts(module):
                layer.via = "experts"
            else:
                layer.observable, layer.why_not = False, why_not
        elif not isinstance(module.router, BaseRouter):
            layer.observable, layer.why_not = False, f"router {type(module.router).__name__} has no capture slot"
        found[module.layer_id] = layer
    return Attachment(sorted(found.values(), key=lambda x: x.layer_id))


def monolithic_experts(runner) -> object | None:
    """The FusedMoEExpertsMonolithic behind a monolithic MoERunner (None when it cannot be found)."""
    kernel = getattr(getattr(runner, "_quant_method", None), "moe_kernel", None)
    return getattr(getattr(kernel, "impl", None), "fused_experts", None)


def kernel_routing(runner) -> tuple[object, str] | None:
    """Where a monolithic CPU kernel of vLLM 0.27-0.29 hands out the ids it routed, as (kernel object, method):
    0.28-0.29: `CPUUnquantizedExperts._select_experts(...)` returns (weights, ids); 0.27: the quant method's
    `cpu_fused_moe` (CPUFusedMOE) routes, then calls its `forward_method(layer, x, weights, ids, ...)`.
    None for any other kernel."""
    experts = monolithic_experts(runner)
    if callable(getattr(experts, "_select_experts", None)):
        return experts, "_select_experts"
    cpu = getattr(getattr(runner, "_quant_method", None), "cpu_fused_moe", None)
    if callable(getattr(cpu, "forward_method", None)):
        return cpu, "forward_method"
    return None


def selects_experts(runner) -> bool:
    return kernel_routing(runner) is not None


def tap_kernel_routing(runner, tap: Tap) -> None:
    """Wrap the method `kernel_routing` names on this layer's kernel object (an instance attribute: the other
    layers' kernels keep theirs); the kernel's arguments and result pass through unchanged."""
    owner, name = kernel_routing(runner)
    if isinstance(getattr(owner, "_moe_monitor_tap", None), Tap):  # attached twice: keep the first tap
        return
    original = getattr(owner, name)
    if name == "_select_experts":
        def routed(*args, **kwargs):
            result = original(*args, **kwargs)
            tap(result[1])  # (topk_weights, topk_ids)
            return result
    else:
        def routed(*args, **kwargs):
            tap(args[3] if len(args) > 3 else kwargs["topk_ids"])  # (layer, x, topk_weights, topk_ids, ...)
            return original(*args, **kwargs)
    setattr(owner, name, functools.wraps(original)(routed))
    owner._moe_monitor_tap = tap


def sink_unusable(runner) -> str:
    """Why this monolithic layer's routing cannot be read through vLLM's routed-experts sink ('' when it can)."""
    quant = type(getattr(runner, "_quant_method", None)).__name__
    try:
        from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExpertsMonolithic
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsSink  # noqa: F401
    except ImportError:
        return f"monolithic kernel {quant} routes internally and this vLLM has no routed-experts sink (>= 0.32)"
    experts = monolithic_experts(runner)
    holder = getattr(runner, "routed_experts", None)
    if not isinstance(experts, FusedMoEExpertsMonolithic) or not hasattr(holder, "routing_sink"):
        return f"monolithic kernel {quant} routes internally and exposes no routed-experts sink"
    try:
        supported = bool(experts.supports_routing_replay_capture())
    except Exception as e:  # noqa: BLE001 - a kernel's answer must not stop the attach of the others
        return f"monolithic kernel {type(experts).__name__} failed to say whether it reports its routing: {e}"
    if not supported:
        return f"monolithic kernel {type(experts).__name__} routes internally and does not report its routing"
    return ""


def tap_layers(attachment: Attachment, recorder: Recorder) -> None:
    """Install a Tap on every observable layer; row i of the recorder is attachment.layers[i]."""
    rows = [row for row, layer in enumerate(attachment.layers) if layer.observable]
    if rows:
        recorder.set_rows(rows)
    for row, layer in enumerate(attachment.layers):
        if not layer.observable:
            log.warning("moe-monitor cannot observe MoE layer %d (%s): %s; it is reported as unobservable",
                        layer.layer_id, layer.name, layer.why_not)
        elif layer.via == "sink":
            tap_sink(layer.module, Tap(recorder, row, None))
        elif layer.via == "experts":
            tap_kernel_routing(layer.module, Tap(recorder, row, None))
        else:
            router = layer.module.router
            existing = router.capture_fn
            if isinstance(existing, Tap):  # attached twice (plugin loaded twice): keep the first tap
                continue
            router.capture_fn = Tap(recorder, row, existing)


def tap_sink(runner, tap: Tap) -> None:
    """Make `tap` the first capture function of the layer's routed-experts sink, creating the sink (vLLM
    then hands the kernel its buffer) when nobody else asked for one. The tap is remembered on the layer,
    so that a sink vLLM binds later gets it back (patch_bind_routed_experts_capturer)."""
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsSink

    holder = runner.routed_experts
    if isinstance(getattr(holder, "_moe_monitor_tap", None), Tap):  # attached twice: keep the first tap
        return
    sink = holder.routing_sink
    if sink is None:
        holder.routing_sink = RoutedExpertsSink(monolithic_experts(runner).moe_config, tap)
    elif not isinstance(sink.capture_fn, Tap):
        tap.chained, sink.capture_fn = sink.capture_fn, tap
    holder._moe_monitor_tap = tap


def retap_sinks(model: torch.nn.Module) -> None:
    """After someone replaced a tapped layer's sink: put our tap first again, theirs chained behind."""
    for module in model.modules():
        tap = getattr(module, "_moe_monitor_tap", None)
        sink = getattr(module, "routing_sink", None)
        if isinstance(tap, Tap) and sink is not None and sink.capture_fn is not tap:
            if not isinstance(sink.capture_fn, Tap):
                tap.chained = sink.capture_fn
            sink.capture_fn = tap


def patch_bind_routed_experts_capturer() -> None:
    """vLLM's `--enable-return-routed-experts` binds its capturer after the model is loaded and gives each
    monolithic layer a new sink, which would drop our tap: re-tap after it. The function is imported by
    name where it is used, so every module holding the original gets the wrapper."""
    try:
        from vllm.model_executor.layers.fused_moe import routed_experts_capturer as rec
    except ImportError:  # no routed-experts capture in this vLLM
        return
    original = getattr(rec, "bind_routed_experts_capturer", None)
    if original is None or getattr(original, "_moe_monitor", False):  # vLLM < 0.32 has no sinks to bind
        return

    @functools.wraps(original)
    def bind_routed_experts_capturer(model, capturer):
        result = original(model, capturer)
        try:
            retap_sinks(model)
        except Exception:  # noqa: BLE001 - never raise into vLLM
            log.exception("moe-monitor could not re-tap the routed-experts sinks vLLM replaced; layers "
                          "counted through a sink stop counting (vLLM is unaffected)")
        return result

    bind_routed_experts_capturer._moe_monitor = True
    for module in list(sys.modules.values()):
        try:
            if getattr(module, "bind_routed_experts_capturer", None) is original:
                module.bind_routed_experts_capturer = bind_routed_experts_capturer
        except Exception:  # noqa: BLE001 - a lazy module that fails on attribute access is not ours to fix
            continue


def patch_set_capture_fn() -> None:
    """Make BaseRouter.set_capture_fn chain behind our Tap instead of evicting it
    (vLLM's --enable-return-routed-experts binds its capturer after the model is loaded)."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    original = BaseRouter.set_capture_fn
    if getattr(original, "_moe_monitor", False):
        return

    def set_capture_fn(self, capture_fn):
        if isinstance(self.capture_fn, Tap) and not isinstance(capture_fn, Tap):
            self.capture_fn.chained = capture_fn
            return
        original(self, capture_fn)

    set_capture_fn._moe_monitor = True
    BaseRouter.set_capture_fn = set_capture_fn
