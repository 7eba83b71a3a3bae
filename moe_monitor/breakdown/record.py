"""The figures of a breakdown that the sidecar's metrics export, and nothing else: the sidecar holds this, not the
whole `BreakdownResult` (its per-step rows grow with the capture), for as long as the capture is the newest."""

from __future__ import annotations

from dataclasses import dataclass

from .result import BreakdownResult, Category


@dataclass(frozen=True)
class BreakdownRecord:
    categories: dict[str, Category]
    ranks: int
    idle_us: float
    moe_blocks: int
    preamble_us: float | None  # per MoE layer, mean; None when no MoE block was found
    first_expert_us: float | None
    ep_wait_us: dict[str, float] | None = None  # per rank: waited in EP collectives (straggler.py); None: no EP
    ep_caused_share: dict[str, float] | None = None  # per rank: share of that waiting it caused
    collective_wait_us: dict[str, dict[str, float]] | None = None  # kind -> rank -> waited (straggler.py)
    collective_caused_us: dict[str, dict[str, dict[str, float]]] | None = None  # kind -> rank -> reason -> caused

    @classmethod
    def of(cls, result: BreakdownResult) -> BreakdownRecord:
        blocks, ep, coll = result.moe_blocks, result.ep_wait, result.collective_wait
        return cls(
            {c: Category(float(row.us), float(row.share)) for c, row in result.categories.items()},
            len(result.ranks), float(result.idle_us), blocks.count,
            float(blocks.preamble_us) if blocks.preamble_us is not None else None,
            float(blocks.first_expert_us) if blocks.first_expert_us is not None else None,
            {r: float(v) for r, v in ep.wait_us.items()} if ep else None,
            {r: float(v) for r, v in ep.caused_share.items()} if ep else None,
            {k: {r: float(v) for r, v in row.wait_us.items()} for k, row in coll.kinds.items()} if coll else None,
            {k: {r: {label: float(getattr(w, field)) for label, field in REASONS.items()} for r, w in row.why.items()}
             for k, row in coll.kinds.items()} if coll else None)

    @classmethod
    def from_json(cls, doc: object) -> BreakdownRecord:
        """A stored breakdown.json's figures; ValueError naming the first thing that is missing or wrong."""
        return cls.of(BreakdownResult.from_json(doc))


REASONS = {"idle": "idle_us", "busy": "busy_us", "unexplained": "unexplained_us"}  # metric label -> Why's field
