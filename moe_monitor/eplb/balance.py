"""Predicted EP-rank load before and after an EPLB placement, the balance figures vLLM and SGLang log, and the
redundant-expert sweep behind `moe-monitor eplb`'s advice. Pure numpy; formulas in docs/eplb.md.

Inputs are a load history `load[L, E]`: routed (token, expert) assignments per MoE layer and logical expert,
summed over a time range. Per-rank loads are `[L, W]` over the W EP ranks (GPUs).

- **Before** (`identity_rank_load`): no EPLB, one copy of each expert, placed as vLLM places them without EPLB
  (`expert_placement_strategy`): "linear" (the default) gives rank r the contiguous experts
  `[r * E/W, (r+1) * E/W)` (when E % W != 0 the first E % W ranks hold one more, as vLLM does); "round_robin"
  gives rank r the experts e with e % W == r.
- **After** (`placement_rank_load`): each physical slot carries its logical expert's load divided by that
  expert's replica count (tokens split evenly over replicas: what vLLM's hash of the token index modulo the
  replica count, and SGLang's dynamic dispatch, give on average), summed over the slots of each rank.

Figures, per layer l over the rank loads r[l, :]:

- straggler factor `max(r[l]) / mean(r[l])` (>= 1): the slowest rank's expert work relative to a perfectly
  balanced layer; the step waits for the slowest rank, so this is the factor on the MoE part of the step time.
- vLLM's balancedness (`vllm.distributed.eplb.eplb_state`, logged with `log_balancedness`):
  `sum_l mean(r[l]) / sum_l max(r[l])`, i.e. the reciprocal of the load-weighted straggler factor.
- SGLang's balancedness (`sglang.srt.eplb.expert_distribution.compute_utilization_rate`, logged as
  "[Expert Balancedness] current_pass_balancedness"): `mean_l (mean(r[l]) + 1e-5) / (max(r[l]) + 1e-5)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_monitor.eplb.placement import Placement, _count, check_load, nonnegative_matrix, plan_placement
from moe_monitor.stats.imbalance import rank_imbalance, sglang_balancedness, vllm_balancedness

__all__ = [
    "Advice",
    "BalanceReport",
    "LoadSummary",
    "SweepPoint",
    "advise",
    "balance_report",
    "identity_rank_load",
    "layer_balancedness",
    "placement_rank_load",
    "redundancy_sweep",
    "sglang_balancedness",
    "straggler_factor",
    "summarize",
    "vllm_balancedness",
    "vllm_balancedness_layer_axis",
]

STRATEGIES = ("linear", "round_robin")


def identity_rank_load(load: object, num_gpus: int, strategy: str = "linear") -> np.ndarray:
    """Per-rank load [L, W] without EPLB: one copy of each logical expert, placed by vLLM's
    `expert_placement_strategy` ("linear" or "round_robin")."""
    w = check_load(load)
    num_gpus = _count(num_gpus, "num_gpus")
    num_experts = w.shape[1]
    if strategy == "linear":
        base, extra = divmod(num_experts, num_gpus)
        owner = np.repeat(np.arange(num_gpus), [base + 1 if r < extra else base for r in range(num_gpus)])
    elif strategy == "round_robin":
        owner = np.arange(num_experts) % num_gpus
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    out = np.zeros((w.shape[0], num_gpus))
    np.add.at(out, (slice(None), owner), w)
    return out


def placement_rank_load(load: object, placement: Placement) -> np.ndarray:
    """Per-rank load [L, W] under `placement`, each replica carrying an equal share of its expert's load."""
    w = check_load(load)
    if w.shape != placement.logcnt.shape:
        raise ValueError(f"load has shape {w.shape} but the placement is for {placement.num_layers} layers x "
                         f"{placement.num_logical} experts")
    rows = np.arange(w.shape[0])[:, None]
    per_slot = w[rows, placement.phy2log] / placement.logcnt[rows, placement.phy2log]
    return per_slot.reshape(w.shape[0], placement.num_gpus, placement.slots_per_gpu).sum(axis=2)


def _rank_load(rank_load: object) -> np.ndarray:
    return nonnegative_matrix(rank_load, "rank_load", "[layers, ranks]")


def straggler_factor(rank_load: object) -> np.ndarray:
    """Per layer max / mean of the rank loads (>= 1; NaN for a layer with no load)."""
    return rank_imbalance(_rank_load(rank_load))


def layer_balancedness(rank_load: object) -> np.ndarray:
    """Per layer mean / max of the rank loads (in (0, 1]; NaN for a layer with no load)."""
    r = _rank_load(rank_load)
    peak = r.max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(peak > 0, r.mean(axis=1) / np.where(peak > 0, peak, 1.0), np.nan)


def vllm_balancedness_layer_axis(rank_load: object) -> float:
    """The number vLLM 0.26 logs as `balancedness` (0.32 reduces over the rank axis instead, the fix referred
    to as vLLM PR #51813): on `num_tokens_per_rank` [layers, ranks] it takes mean and max over dim 0, the LAYER
    axis, then sums over ranks: `sum_r mean_l(r[l, r]) / sum_r max_l(r[l, r])`. It measures how much each rank's
    load varies between layers, not rank balance: a layout with one rank always twice as loaded as the others
    logs 1.0. Given only to read old vLLM logs against `vllm_balancedness`."""
    r = _rank_load(rank_load)
    peak = r.max(axis=0).sum()
    return float(r.mean(axis=0).sum() / peak) if peak > 0 else float("nan")


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined figure (a layer with no load) is written as null."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class LoadSummary:
    """One placement's predicted per-rank load and its balance figures."""

    rank_load: np.ndarray  # [L, W]
    straggler: np.ndarray  # [L] max / mean, NaN for layers without load
    balancedness: np.ndarray  # [L] mean / max, NaN for layers without load
    vllm_balancedness: float
    sglang_balancedness: float

    @property
    def mean_straggler(self) -> float:
        """Straggler factor averaged over the layers that carry load."""
        return float(np.nanmean(self.straggler))

    @property
    def worst_straggler(self) -> float:
        return float(np.nanmax(self.straggler))

    @property
    def worst_layer(self) -> int:
        return int(np.nanargmax(self.straggler))

    def to_dict(self, per_layer: bool = True) -> dict:
        doc = {
            "straggler_mean": _finite(self.mean_straggler),
            "straggler_worst": _finite(self.worst_straggler),
            "worst_layer": self.worst_layer,
            "balancedness_vllm": _finite(self.vllm_balancedness),
            "balancedness_sglang": _finite(self.sglang_balancedness),
        }
        if per_layer:
            doc["straggler_per_layer"] = [_finite(x) for x in self.straggler]
            doc["balancedness_per_layer"] = [_finite(x) for x in self.balancedness]
            doc["rank_load"] = self.rank_load.tolist()
        return doc


def summarize(rank_load: object) -> LoadSummary:
    r = _rank_load(rank_load)
    if r.sum() <= 0:
        raise ValueError("rank_load is all zero: nothing to summarize")
    return LoadSummary(rank_load=r, straggler=straggler_factor(r), balancedness=layer_balancedness(r),
                       vllm_balancedness=vllm_balancedness(r), sglang_balancedness=sglang_balancedness(r))


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


@dataclass(frozen=True)
class BalanceReport:
    """Before (no EPLB, `strategy` placement) and after (`placement`) for one load history."""

    placement: Placement
    strategy: str
    before: LoadSummary
    after: LoadSummary

    def to_dict(self, per_layer: bool = True) -> dict:
        p = self.placement
        return {
            "deployment": {
                "num_layers": p.num_layers, "num_logical_experts": p.num_logical, "num_gpus": p.num_gpus,
                "num_nodes": p.num_nodes, "num_groups": p.num_groups, "num_redundant_experts": p.num_redundant,
                "num_physical_experts": p.num_physical, "slots_per_gpu": p.slots_per_gpu, "policy": p.policy,
                "before_strategy": self.strategy,
            },
            "before": self.before.to_dict(per_layer),
            "after": self.after.to_dict(per_layer),
        }

    def format_table(self, per_layer: bool = False) -> str:
        p = self.placement
        lines = [
            f"EPLB placement: {p.num_logical} logical + {p.num_redundant} redundant = {p.num_physical} physical "
            f"experts per layer on {p.num_gpus} GPUs ({p.slots_per_gpu} per GPU), {p.num_nodes} node(s), "
            f"{p.num_groups} expert group(s), {p.policy} policy; {p.num_layers} MoE layers",
            f"{'':24}{'before (no EPLB, ' + self.strategy + ')':>28}{'after (EPLB)':>16}",
        ]
        b, a = self.before, self.after
        rows = [
            ("straggler max/mean", _fmt(b.mean_straggler), _fmt(a.mean_straggler)),
            ("  worst layer", f"{_fmt(b.worst_straggler)} (L{b.worst_layer})",
             f"{_fmt(a.worst_straggler)} (L{a.worst_layer})"),
            ("balancedness vLLM", _fmt(b.vllm_balancedness, 4), _fmt(a.vllm_balancedness, 4)),
            ("balancedness SGLang", _fmt(b.sglang_balancedness, 4), _fmt(a.sglang_balancedness, 4)),
        ]
        lines += [f"{name:24}{x:>28}{y:>16}" for name, x, y in rows]
        if per_layer:
            lines.append(f"{'layer':>6}{'before max/mean':>18}{'after max/mean':>18}")
            lines += [f"{layer:>6}{_fmt(x):>18}{_fmt(y):>18}"
                      for layer, (x, y) in enumerate(zip(b.straggler, a.straggler))]
        return "\n".join(lines)


def balance_report(load: object, placement: Placement, *, strategy: str = "linear") -> BalanceReport:
    """Predicted balance of `load` without EPLB (`strategy`) and under `placement`."""
    w = check_load(load)
    return BalanceReport(placement=placement, strategy=strategy,
                         before=summarize(identity_rank_load(w, placement.num_gpus, strategy)),
                         after=summarize(placement_rank_load(w, placement)))


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the sweep. num_redundant None is the baseline: EPLB off (no placement)."""

    num_redundant: int | None
    slots_per_gpu: float  # expert weights held per GPU (E / W for the baseline, may be fractional there)
    summary: LoadSummary

    @property
    def label(self) -> str:
        return "off" if self.num_redundant is None else str(self.num_redundant)

    def to_dict(self) -> dict:
        s = self.summary
        return {
            "num_redundant_experts": self.num_redundant, "eplb": self.num_redundant is not None,
            "slots_per_gpu": self.slots_per_gpu,
            "straggler_mean": _finite(s.mean_straggler), "straggler_worst": _finite(s.worst_straggler),
            "worst_layer": s.worst_layer,
            "balancedness_vllm": _finite(s.vllm_balancedness),
            "balancedness_sglang": _finite(s.sglang_balancedness),
        }


RULE = ("recommended = the smallest number of redundant experts whose mean straggler factor (max/mean rank "
        "load, averaged over layers) is within the tolerance of the best in the sweep; EPLB is worth enabling "
        "when that factor beats EPLB off (the '{strategy}' placement) by more than the same tolerance")


@dataclass(frozen=True)
class Advice:
    """The sweep and its reading. `recommended` is the EPLB setting chosen by the rule, the one to use when EPLB
    is enabled; `enable_eplb` says whether it beats EPLB off (`baseline`) by more than the tolerance."""

    baseline: SweepPoint
    points: tuple[SweepPoint, ...]
    recommended: SweepPoint
    enable_eplb: bool
    tolerance: float
    strategy: str
    num_gpus: int
    num_nodes: int
    num_groups: int

    @property
    def rule(self) -> str:
        return RULE.format(strategy=self.strategy)

    @property
    def predicted_gain(self) -> float:
        """EPLB off's mean straggler factor / the recommended setting's: the predicted factor on the time the
        slowest rank spends in expert work (1.0: no gain)."""
        return self.baseline.summary.mean_straggler / self.recommended.summary.mean_straggler

    def to_dict(self) -> dict:
        return {
            "num_gpus": self.num_gpus, "num_nodes": self.num_nodes, "num_groups": self.num_groups,
            "tolerance": self.tolerance, "rule": self.rule, "enable_eplb": self.enable_eplb,
            "recommended_num_redundant_experts": self.recommended.num_redundant if self.enable_eplb else None,
            "best_eplb_num_redundant_experts": self.recommended.num_redundant,
            "predicted_gain": _finite(self.predicted_gain),
            "baseline": self.baseline.to_dict(),
            "sweep": [p.to_dict() for p in self.points],
        }

    def format_table(self) -> str:
        head = (f"{'redundant':>9}{'experts/GPU':>13}{'straggler mean':>16}{'worst (layer)':>16}"
                f"{'vLLM bal.':>11}{'SGLang bal.':>13}")
        lines = [f"EPLB sweep on {self.num_gpus} GPUs, {self.num_nodes} node(s), {self.num_groups} expert "
                 f"group(s); straggler = max/mean EP-rank load, 1.000 = perfectly balanced", head]
        for point in (self.baseline, *self.points):
            s = point.summary
            mark = "  <- recommended" if point is self.recommended and self.enable_eplb else ""
            if point is self.baseline and not self.enable_eplb:
                mark = "  <- recommended (EPLB does not pay)"
            slots = f"{point.slots_per_gpu:g}"
            lines.append(f"{point.label:>9}{slots:>13}{_fmt(s.mean_straggler):>16}"
                         f"{_fmt(s.worst_straggler) + f' ({s.worst_layer})':>16}"
                         f"{_fmt(s.vllm_balancedness, 4):>11}{_fmt(s.sglang_balancedness, 4):>13}{mark}")
        lines.append(f"rule: {self.rule} (tolerance {self.tolerance:.1%})")
        return "\n".join(lines)


def redundancy_sweep(num_experts: int, num_gpus: int, steps: int = 4) -> list[int]:
    """Redundant-expert counts to try: the smallest r >= 0 with (E + r) % W == 0 (0 when W divides E), then
    r + W, r + 2W, ..., `steps` GPUs' worth more (one, two, ... extra experts per GPU)."""
    num_experts = _count(num_experts, "num_experts")
    num_gpus = _count(num_gpus, "num_gpus")
    steps = _count(steps, "steps", minimum=0)
    first = (-num_experts) % num_gpus
    while num_experts + first < num_gpus:  # more GPUs than experts: every rank needs a slot
        first += num_gpus
    return [first + k * num_gpus for k in range(steps + 1)]


def advise(load: object, *, num_gpus: int, num_nodes: int = 1, num_groups: int = 1,
           redundant: Iterable[int] | None = None, tolerance: float = 0.01, strategy: str = "linear") -> Advice:
    """Sweep redundant experts (default `redundancy_sweep(E, W)`) and recommend one (`RULE`)."""
    w = check_load(load)
    num_gpus = _count(num_gpus, "num_gpus")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    values: Sequence[int] = redundancy_sweep(w.shape[1], num_gpus) if redundant is None else list(redundant)
    if not values:
        raise ValueError("redundant: give at least one number of redundant experts")
    values = sorted({_count(r, "redundant experts", minimum=0) for r in values})
    baseline = SweepPoint(None, w.shape[1] / num_gpus, summarize(identity_rank_load(w, num_gpus, strategy)))
    points = []
    for r in values:
        placement = plan_placement(w, num_gpus=num_gpus, num_redundant=r, num_nodes=num_nodes,
                                   num_groups=num_groups)
        points.append(SweepPoint(r, placement.slots_per_gpu, summarize(placement_rank_load(w, placement))))
    best = min(p.summary.mean_straggler for p in points)
    recommended = next(p for p in points if p.summary.mean_straggler <= best * (1 + tolerance))
    enable = recommended.summary.mean_straggler * (1 + tolerance) < baseline.summary.mean_straggler
    return Advice(baseline=baseline, points=tuple(points), recommended=recommended, enable_eplb=enable,
                  tolerance=float(tolerance), strategy=strategy, num_gpus=num_gpus, num_nodes=num_nodes,
                  num_groups=num_groups)
