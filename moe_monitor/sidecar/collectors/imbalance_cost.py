"""What EP-rank imbalance costs in the last closed window: the fraction of expert time lost per layer and over
the model (routing only), and of step time (with the experts' share from the newest analysed capture). The
formulas and their assumptions: stats/imbalance_cost.py, docs/metrics.md "What imbalance costs"."""

from __future__ import annotations

from moe_monitor.stats.imbalance_cost import (
    expert_time_lost,
    experts_share_of_steps,
    layer_expert_time_lost,
    step_time_lost,
)

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector, layer_family


def experts_share(r: Reading) -> float | None:
    """The experts' share of step time in the newest analysed capture; None without one."""
    result = r.breakdown.result if r.breakdown is not None else None
    if result is None or "experts" not in result.categories:
        return None
    busy = sum(row.us for row in result.categories.values())
    return experts_share_of_steps(result.categories["experts"].us, busy, result.idle_us)


def collect(r: Reading) -> list[Family]:
    load, window = r.window_rank_load, r.window
    if load is None or window is None:
        return []
    least = r.config.min_window_assignments
    per_layer, total = layer_expert_time_lost(load, least), expert_time_lost(load, least)
    if per_layer is None or total is None:  # one EP rank: nobody waits
        return []
    out = [layer_family("moe_layer_ep_expert_time_lost_ratio", window.layer_ids, per_layer)]
    model = family("moe_ep_expert_time_lost_ratio")
    model.add(total)
    out.append(model)
    step = step_time_lost(load, experts_share(r), least)
    if step is not None:
        f = family("moe_ep_step_time_lost_ratio")
        f.add(step)
        out.append(f)
    return out


COLLECTOR = Collector("imbalance_cost", "t0", collect)
