"""The typed view of a breakdown (what `analyze` returns and the catalog stores as breakdown.json) that the
metrics read: built once, checked once, so a damaged breakdown.json is refused with what is wrong instead of
failing the exporter later."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard


@dataclass(frozen=True)
class Category:
    us: float
    share: float


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
    def from_json(cls, result) -> BreakdownRecord:
        """Raises ValueError naming the first thing that is missing or of the wrong type."""
        if not isinstance(result, dict):
            raise ValueError(f"a {type(result).__name__}, not an object")
        categories = result.get("categories")
        if not isinstance(categories, dict):
            raise ValueError("categories is not an object")
        typed = {}
        for name, row in categories.items():
            if not isinstance(row, dict) or not _number(row.get("us")) or not _number(row.get("share")):
                raise ValueError(f"category {name!r} lacks numeric us and share")
            typed[name] = Category(float(row["us"]), float(row["share"]))
        if not isinstance(result.get("ranks"), list):
            raise ValueError("ranks is not a list")
        if not _number(result.get("idle_us")):
            raise ValueError("idle_us is not a number")
        blocks = result.get("moe_blocks")
        if not isinstance(blocks, dict) or not isinstance(blocks.get("count"), int):
            raise ValueError("moe_blocks.count is not an integer")
        pre_us, first_us = blocks.get("preamble_us"), blocks.get("first_expert_us")
        pre: float | None = None
        first: float | None = None
        if blocks["count"]:
            if not (_number(pre_us) and _number(first_us)):
                raise ValueError("moe_blocks lacks preamble_us and first_expert_us")
            pre, first = float(pre_us), float(first_us)
        ep_wait, ep_caused = None, None
        wait = result.get("ep_wait")  # absent in breakdowns stored before it existed
        if wait is not None:
            if not isinstance(wait, dict) or not all(_per_rank(wait.get(k)) for k in ("wait_us", "caused_share")):
                raise ValueError("ep_wait lacks per-rank numeric wait_us and caused_share")
            ep_wait = {r: float(v) for r, v in wait["wait_us"].items()}
            ep_caused = {r: float(v) for r, v in wait["caused_share"].items()}
        waits, caused = _collective_wait(result.get("collective_wait"))  # absent before it existed
        return cls(typed, len(result["ranks"]), float(result["idle_us"]), blocks["count"], pre, first, ep_wait,
                   ep_caused, waits, caused)


REASONS = {"idle": "idle_us", "busy": "busy_us", "unexplained": "unexplained_us"}  # metric label -> why's field


def _collective_wait(doc) -> tuple[dict | None, dict | None]:
    """(kind -> rank -> wait us, kind -> rank -> reason -> caused us) of straggler.collective_wait's result."""
    if doc is None:
        return None, None
    kinds = doc.get("kinds") if isinstance(doc, dict) else None
    if not isinstance(kinds, dict):
        raise ValueError("collective_wait lacks kinds")
    waits, caused = {}, {}
    for kind, row in kinds.items():
        why = row.get("why") if isinstance(row, dict) else None
        if not _per_rank(row.get("wait_us") if isinstance(row, dict) else None) or not isinstance(why, dict) or \
                not all(isinstance(w, dict) and all(_number(w.get(f)) for f in REASONS.values()) for w in why.values()):
            raise ValueError(f"collective_wait kind {kind!r} lacks per-rank numeric wait_us and why")
        waits[kind] = {r: float(v) for r, v in row["wait_us"].items()}
        caused[kind] = {r: {label: float(w[f]) for label, f in REASONS.items()} for r, w in why.items()}
    return waits, caused


def _per_rank(value) -> bool:
    return isinstance(value, dict) and all(isinstance(r, str) and _number(v) for r, v in value.items())


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
