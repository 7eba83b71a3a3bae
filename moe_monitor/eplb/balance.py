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
import numpy.typing as npt

from moe_monitor.eplb.placement import Plan, _count, check_load, nonnegative_matrix, plan_placement
from moe_monitor.stats.imbalance import rank_imbalance, sglang_balancedness, vllm_balancedness

__all__ = [
    "Advice",
    "BalanceReport",
    "Confidence",
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
    np.add.at(out, (slice(None), owner), w)  # type: ignore[arg-type]  # numpy's stubs omit the tuple index it takes
    return out


def placement_rank_load(load: object, plan: Plan) -> np.ndarray:
    """Per-rank load [L, W] under the plan's placement, each replica carrying an equal share of its expert's load
    (`Placement.rank_load`, the split the sidecar exports)."""
    w = check_load(load)
    placement = plan.placement
    if w.shape != (placement.num_layers, plan.num_logical):
        raise ValueError(f"load has shape {w.shape} but the placement is for {placement.num_layers} layers x "
                         f"{plan.num_logical} experts")
    return placement.rank_load(w)


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
        doc: dict[str, object] = {
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
    """Before (no EPLB, `strategy` placement) and after (`plan`) for one load history."""

    plan: Plan
    strategy: str
    before: LoadSummary
    after: LoadSummary

    def to_dict(self, per_layer: bool = True) -> dict:
        p, pl = self.plan, self.plan.placement
        return {
            "deployment": {
                "num_layers": pl.num_layers, "num_logical_experts": p.num_logical, "num_gpus": pl.num_ranks,
                "num_nodes": p.num_nodes, "num_groups": p.num_groups, "num_redundant_experts": p.num_redundant,
                "num_physical_experts": pl.num_physical, "slots_per_gpu": pl.slots_per_rank, "policy": p.policy,
                "before_strategy": self.strategy,
            },
            "before": self.before.to_dict(per_layer),
            "after": self.after.to_dict(per_layer),
        }

    def format_table(self, per_layer: bool = False) -> str:
        p, pl = self.plan, self.plan.placement
        lines = [
            f"EPLB placement: {p.num_logical} logical + {p.num_redundant} redundant = {pl.num_physical} physical "
            f"experts per layer on {pl.num_ranks} GPUs ({pl.slots_per_rank} per GPU), {p.num_nodes} node(s), "
            f"{p.num_groups} expert group(s), {p.policy} policy; {pl.num_layers} MoE layers",
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


def balance_report(load: object, plan: Plan, *, strategy: str = "linear") -> BalanceReport:
    """Predicted balance of `load` without EPLB (`strategy`) and under the plan's placement."""
    w = check_load(load)
    return BalanceReport(plan=plan, strategy=strategy,
                         before=summarize(identity_rank_load(w, plan.placement.num_ranks, strategy)),
                         after=summarize(placement_rank_load(w, plan)))


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


MIN_PER_CELL = 100.0  # mean assignments per layer x expert cell for a recommendation: a cell's count then varies by
# about 1/sqrt(100) = 10 % between equal-length ranges, less than the imbalance EPLB is worth enabling for
FOLDS = 4  # sub-ranges of the history the recommendation is checked over
NULL_DRAWS = 2  # uniform re-draws of the folds that measure what sampling noise alone scores


@dataclass(frozen=True)
class Confidence:
    """How far the history supports the recommendation. Each of the history's sub-ranges (`folds`) is held out in
    turn: placements planned on the rest are scored on it (`held_out`, mean straggler per setting), and the rule
    picks that fold's setting (`per_fold`); from every score is taken what the same folds score when their tokens
    are routed uniformly (sampling noise alone). The recommendation stands when the sample is large enough and every
    fold agrees on enabling EPLB and lands within one redundant expert per GPU of it; else `withheld` says why."""

    assignments: int
    per_cell: float  # mean assignments per layer x expert cell
    min_per_cell: float
    folds: int  # sub-ranges the history had (0: one range, no check possible)
    per_fold: tuple[int | None, ...]  # the setting each held-out fold chose (None: EPLB off)
    held_out: tuple[float, ...]  # per sweep setting, mean straggler on held-out folds (baseline first)
    withheld: str  # "" when the recommendation stands

    @property
    def stands(self) -> bool:
        return not self.withheld

    def to_dict(self) -> dict:
        return {"assignments": self.assignments, "per_cell": self.per_cell, "min_per_cell": self.min_per_cell,
                "folds": self.folds, "per_fold": list(self.per_fold),
                "held_out_straggler_mean": [_finite(x) for x in self.held_out], "stands": self.stands,
                "withheld": self.withheld or None}

    def line(self) -> str:
        folds = ", ".join("off" if r is None else str(r) for r in self.per_fold) or "-"
        return (f"sample: {self.assignments:,} assignments, {self.per_cell:,.0f} per layer x expert (needs "
                f"{self.min_per_cell:,.0f}); each of {self.folds} sub-ranges held out in turn chose: {folds}")


@dataclass(frozen=True)
class Advice:
    """The sweep and its reading. `recommended` is the EPLB setting chosen by the rule, the one to use when EPLB
    is enabled; `enable_eplb` says whether it beats EPLB off (`baseline`) by more than the tolerance;
    `confidence` whether the history supports saying so (`recommendation` is None when it does not)."""

    baseline: SweepPoint
    points: tuple[SweepPoint, ...]
    recommended: SweepPoint
    enable_eplb: bool
    tolerance: float
    strategy: str
    num_gpus: int
    num_nodes: int
    num_groups: int
    confidence: Confidence

    @property
    def rule(self) -> str:
        return RULE.format(strategy=self.strategy)

    @property
    def stands(self) -> bool:
        return self.confidence.stands

    @property
    def predicted_gain(self) -> float:
        """EPLB off's mean straggler factor / the recommended setting's: the predicted factor on the time the
        slowest rank spends in expert work (1.0: no gain)."""
        return self.baseline.summary.mean_straggler / self.recommended.summary.mean_straggler

    def to_dict(self) -> dict:
        return {
            "num_gpus": self.num_gpus, "num_nodes": self.num_nodes, "num_groups": self.num_groups,
            "tolerance": self.tolerance, "rule": self.rule,
            "enable_eplb": self.enable_eplb if self.stands else None,
            "recommended_num_redundant_experts": self.recommended.num_redundant
            if self.enable_eplb and self.stands else None,
            "best_eplb_num_redundant_experts": self.recommended.num_redundant,
            "predicted_gain": _finite(self.predicted_gain),
            "confidence": self.confidence.to_dict(),
            "baseline": self.baseline.to_dict(),
            "sweep": [p.to_dict() for p in self.points],
        }

    def format_table(self) -> str:
        head = (f"{'redundant':>9}{'experts/GPU':>13}{'straggler mean':>16}{'worst (layer)':>16}"
                f"{'vLLM bal.':>11}{'SGLang bal.':>13}{'held out':>10}")
        lines = [f"EPLB sweep on {self.num_gpus} GPUs, {self.num_nodes} node(s), {self.num_groups} expert "
                 f"group(s); straggler = max/mean EP-rank load, 1.000 = perfectly balanced", head]
        held = self.confidence.held_out
        for i, point in enumerate((self.baseline, *self.points)):
            s = point.summary
            mark = ""
            if self.stands:
                if point is self.recommended and self.enable_eplb:
                    mark = "  <- recommended"
                elif point is self.baseline and not self.enable_eplb:
                    mark = "  <- recommended (EPLB does not pay)"
            slots = f"{point.slots_per_gpu:g}"
            out = _fmt(held[i]) if i < len(held) else "-"
            lines.append(f"{point.label:>9}{slots:>13}{_fmt(s.mean_straggler):>16}"
                         f"{_fmt(s.worst_straggler) + f' ({s.worst_layer})':>16}"
                         f"{_fmt(s.vllm_balancedness, 4):>11}{_fmt(s.sglang_balancedness, 4):>13}{out:>10}{mark}")
        lines.append(f"rule: {self.rule} (tolerance {self.tolerance:.1%}), on the held-out straggler when the "
                     "history has sub-ranges")
        lines.append(self.confidence.line())
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
           redundant: Iterable[int] | None = None, tolerance: float = 0.01, strategy: str = "linear",
           parts: Sequence[npt.ArrayLike] = (), min_per_cell: float = MIN_PER_CELL) -> Advice:
    """Sweep redundant experts (default `redundancy_sweep(E, W)`) and recommend one (`RULE`). `parts`: the
    history's time-ordered sub-ranges (their sum is about `load`); with two or more, the rule reads each setting's
    straggler on held-out sub-ranges (a placement fitted to noise does not carry over) and the recommendation
    stands only when the sub-ranges agree (`Confidence`)."""
    w = check_load(load)
    num_gpus = _count(num_gpus, "num_gpus")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    values: Sequence[int] = redundancy_sweep(w.shape[1], num_gpus) if redundant is None else list(redundant)
    if not values:
        raise ValueError("redundant: give at least one number of redundant experts")
    values = sorted({_count(r, "redundant experts", minimum=0) for r in values})
    folds = [check_load(p) for p in parts if np.any(p)]  # a sub-range with no traffic checks nothing
    if any(f.shape != w.shape for f in folds):
        raise ValueError(f"parts: every sub-range must be {w.shape[0]} layers x {w.shape[1]} experts like the load")

    def plan(fit: np.ndarray, r: int) -> Plan:
        return plan_placement(fit, num_gpus=num_gpus, num_redundant=r, num_nodes=num_nodes, num_groups=num_groups)

    baseline = SweepPoint(None, w.shape[1] / num_gpus, summarize(identity_rank_load(w, num_gpus, strategy)))
    points = []
    for r in values:
        planned = plan(w, r)
        points.append(SweepPoint(r, planned.placement.slots_per_rank, summarize(placement_rank_load(w, planned))))
    score = [p.summary.mean_straggler for p in points]
    held: list[float] = []
    per_fold: list[int | None] = []
    usable = [f for f in folds if f.any() and (w - f).any()]
    if len(usable) >= 2:
        def held_out(fs: list[np.ndarray]) -> np.ndarray:  # [fold, baseline + settings]
            total = sum(fs)
            return np.array([[_mean_straggler(identity_rank_load(f, num_gpus, strategy))] +
                             [_mean_straggler(placement_rank_load(f, plan(np.maximum(total - f, 0.0), r)))
                              for r in values] for f in fs])

        # What sampling noise alone scores: the same folds' token counts routed uniformly. Replicas smooth a
        # small sample's noise as they smooth skew, so without this a short, balanced history "gains" from EPLB.
        rng = np.random.default_rng(0)
        noise = np.mean([held_out([_uniform_like(f, rng) for f in usable]) for _ in range(NULL_DRAWS)], axis=0)
        table = held_out(usable) - (noise - 1.0)
        held = [float(x) for x in table.mean(axis=0)]
        score = held[1:]
        for row in table:
            pick = _rule(list(row[1:]), tolerance)
            per_fold.append(values[pick] if row[1 + pick] * (1 + tolerance) < row[0] else None)
    pick = _rule(score, tolerance)
    recommended = points[pick]
    base = held[0] if held else baseline.summary.mean_straggler
    enable = score[pick] * (1 + tolerance) < base
    confidence = _confidence(w, min_per_cell, len(usable), per_fold, held,
                             recommended.num_redundant if enable else None, num_gpus)
    return Advice(baseline=baseline, points=tuple(points), recommended=recommended, enable_eplb=enable,
                  tolerance=float(tolerance), strategy=strategy, num_gpus=num_gpus, num_nodes=num_nodes,
                  num_groups=num_groups, confidence=confidence)


def _uniform_like(fold: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each layer's assignments of `fold` spread over its experts uniformly at random."""
    n = np.rint(fold.sum(axis=1)).astype(np.int64)
    return np.stack([rng.multinomial(k, np.full(fold.shape[1], 1.0 / fold.shape[1])) for k in n]).astype(float)


def _mean_straggler(rank_load: np.ndarray) -> float:
    return summarize(rank_load).mean_straggler


def _rule(scores: list[float], tolerance: float) -> int:
    """The first (fewest redundant experts) setting within the tolerance of the best."""
    best = min(scores)
    return next(i for i, x in enumerate(scores) if x <= best * (1 + tolerance))


def _confidence(w: np.ndarray, min_per_cell: float, folds: int, per_fold: list[int | None], held: list[float],
                chosen: int | None, num_gpus: int) -> Confidence:
    per_cell = float(w.sum()) / w.size
    why = ""
    if per_cell < min_per_cell:
        why = (f"too little routing recorded: {per_cell:,.0f} assignments per layer x expert, {min_per_cell:,.0f} "
               "needed (a longer range: --minutes, --range, or a later capture)")
    elif folds < 2:
        why = ("the history is one range: no sub-ranges to check the recommendation on (a flight record of two "
               "windows or more, or a Prometheus range)")
    else:
        off = [r for r in per_fold if (r is None) != (chosen is None)]
        far = [r for r in per_fold if r is not None and chosen is not None and abs(r - chosen) > num_gpus]
        if off or far:
            choices = ", ".join("off" if r is None else str(r) for r in per_fold)
            why = (f"not stable: the {folds} sub-ranges, each held out in turn, chose {choices} (the load moves more "
                   "than the placements differ: a longer range, or one of steadier traffic)")
    return Confidence(int(w.sum()), per_cell, float(min_per_cell), folds, tuple(per_fold), tuple(held), why)
