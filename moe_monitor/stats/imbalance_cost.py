"""What EP-rank imbalance costs: the fraction of expert time, and of step time, lost to waiting for the busiest
EP rank. Pure numpy: EP-rank loads (and one share from a capture) in, fractions out.

The model (docs/metrics.md, "What imbalance costs"). With expert parallelism every EP rank waits at a layer's
combine for the slowest, so a layer's expert time on the critical path goes as its largest rank load, `max_l`;
with the same tokens spread evenly it would go as the mean, `mean_l`. Assuming expert time proportional to the
assignments a rank serves (the same cost per assignment on every rank and layer):

- per layer, the fraction of its expert time lost is `(max_l - mean_l) / max_l = 1 - mean_l / max_l`, one minus
  the layer's EP-rank balancedness;
- over the model, each layer weighs as its expert time, `max_l`: `sum(max_l - mean_l) / sum(max_l)`, which is
  `1 - ` vLLM EPLB's balancedness `sum(mean_l) / sum(max_l)`;
- of step time, the lost expert time over the step: a profiler capture's expert device time summed over its ranks
  is every rank's own share of the work, `sum(mean_l)` per rank (the time the others spend waiting lands in their
  EP collectives, not in `experts`), so with `s` the experts' share of the capture's step time the fraction lost
  is `s * (sum(max_l) / sum(mean_l) - 1)`. Not `s * (1 - balancedness)`: that would take `s` for the busiest
  rank's share, which a breakdown summed over ranks is not.

One EP rank waits for no other: no figure (None), rather than a 0 that reads like a measured balance.
"""

from __future__ import annotations

import numpy as np


def _judged(rank_load: np.ndarray, min_assignments: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(max per layer, mean per layer, layers with enough assignments to judge), or None with fewer than two EP
    ranks."""
    r = np.asarray(rank_load, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        return None
    ok = r.sum(axis=1) >= max(min_assignments, 1)
    return r.max(axis=1), r.mean(axis=1), ok


def layer_expert_time_lost(rank_load: np.ndarray, min_assignments: int = 1) -> np.ndarray | None:
    """Per layer, `1 - mean / max` of its EP-rank loads (rank_load [layers, ranks]): the fraction of the layer's
    expert time spent waiting for its busiest rank (0 = balanced). NaN for a layer with fewer than
    `min_assignments` assignments; None with fewer than two EP ranks."""
    judged = _judged(rank_load, min_assignments)
    if judged is None:
        return None
    peak, mean, ok = judged
    return np.where(ok, 1.0 - mean / np.where(ok, peak, 1.0), np.nan)


def expert_time_lost(rank_load: np.ndarray, min_assignments: int = 1) -> float | None:
    """Over the model: `sum(max_l - mean_l) / sum(max_l)` over the layers with enough assignments, each layer
    weighed by its expert time (`max_l`), = 1 - vLLM's balancedness over those layers. NaN when no layer has
    enough; None with fewer than two EP ranks."""
    judged = _judged(rank_load, min_assignments)
    if judged is None:
        return None
    peak, mean, ok = judged
    if not ok.any():
        return float("nan")
    return float((peak[ok] - mean[ok]).sum() / peak[ok].sum())


def step_time_lost(rank_load: np.ndarray, experts_share: float | None, min_assignments: int = 1) -> float | None:
    """The fraction of step time lost to EP-rank imbalance: `experts_share * (sum(max_l) / sum(mean_l) - 1)` over
    the layers with enough assignments, with `experts_share` the experts' share of step time in a capture summed
    over its ranks (`experts_share_of_steps`). NaN when no layer has enough assignments. None with fewer than two
    EP ranks, without a share, or when the inputs contradict each other: the busiest rank's expert time
    (`experts_share * sum(max_l) / sum(mean_l)` of the step) would exceed the whole step, so the share cannot come
    from a workload like this window's."""
    judged = _judged(rank_load, min_assignments)
    if judged is None or experts_share is None or not np.isfinite(experts_share) or experts_share < 0:
        return None
    peak, mean, ok = judged
    if not ok.any():
        return float("nan")
    stretch = peak[ok].sum() / mean[ok].sum()  # >= 1: busiest-rank expert time over the even spread's
    if experts_share * stretch > 1.0 + 1e-9:  # rounding of a step with no other work
        return None
    return float(experts_share * (stretch - 1.0))


def experts_share_of_steps(experts_us: float, busy_us: float, idle_us: float) -> float | None:
    """The experts' share of step time in a capture: expert device time over device time inside steps, idle
    between kernels included (a rank's step lasts its busy plus its idle time). None when the capture has no
    time."""
    total = busy_us + idle_us
    return experts_us / total if total > 0 else None
