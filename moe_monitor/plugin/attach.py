"""Find a vLLM model's MoE layers and tap their routers, chaining any capture function already there."""

from __future__ import annotations

import logging
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
            layer.observable, layer.why_not = False, f"monolithic kernel {type(quant).__name__} routes internally"
        elif not isinstance(module.router, BaseRouter):
            layer.observable, layer.why_not = False, f"router {type(module.router).__name__} has no capture slot"
        found[module.layer_id] = layer
    return Attachment(sorted(found.values(), key=lambda x: x.layer_id))


def tap_layers(attachment: Attachment, recorder: Recorder) -> None:
    """Install a Tap on every observable layer; row i of the recorder is attachment.layers[i]."""
    rows = [row for row, layer in enumerate(attachment.layers) if layer.observable]
    if rows:
        recorder.set_rows(rows)
    for row, layer in enumerate(attachment.layers):
        if not layer.observable:
            log.warning("moe-monitor cannot observe MoE layer %d (%s): %s; it is reported as unobservable",
                        layer.layer_id, layer.name, layer.why_not)
            continue
        router = layer.module.router
        existing = router.capture_fn
        if isinstance(existing, Tap):  # attached twice (plugin loaded twice): keep the first tap
            continue
        router.capture_fn = Tap(recorder, row, existing)


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
