"""Expert-load statistics of one window. Pure numpy: counts in, numbers out, no I/O.

`counts` is [layers, experts]: routed (token, expert) assignments per logical expert in the window.
Formulas are documented, with the same names, in docs/metrics.md.

Empty or tiny windows: a layer with fewer than `min_assignments` assignments in the window has no
meaningful balance. Its ratios, shares, CV, entropy and dead/hot counts are NaN (Prometheus keeps the
series; comparisons with NaN are false, so alerts do not fire on idle layers), never a misleading 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SGLANG_EPS = 1e-5


@dataclass(frozen=True)
class LayerStats:
    """Per-layer figures, each an array [layers] (float64; NaN where the window is too small)."""

    tokens: np.ndarray  # assignments in the window (not NaN-masked)
    imbalance_ratio: np.ndarray  # max / mean load, >= 1
    balancedness: np.ndarray  # mean / max load, in (0, 1]
    cv: np.ndarray  # population std / mean
    entropy: np.ndarray  # Shannon entropy of the load distribution / log(E), in [0, 1]
    top1_share: np.ndarray  # max / total
    topk_share: np.ndarray  # the k most loaded experts' load / total
    dead_experts: np.ndarray  # experts with no assignment
    hot_experts: np.ndarray  # experts with load > hot_multiple x mean


def layer_stats(counts: np.ndarray, *, top_k: int, hot_multiple: float = 2.0,
                min_assignments: int = 1) -> LayerStats:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"counts must be [layers, experts], got shape {c.shape}")
    L, E = c.shape
    total = c.sum(axis=1)
    ok = total >= max(min_assignments, 1)
    safe_total = np.where(ok, total, 1.0)
    mean = safe_total / E
    peak = c.max(axis=1)
    p = c / safe_total[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(axis=1) / np.log(E) if E > 1 else np.ones(L)
    k = min(max(top_k, 1), E)
    topk = -np.sort(-c, axis=1)[:, :k].sum(axis=1)

    def masked(x):
        return np.where(ok, x, np.nan)

    return LayerStats(
        tokens=total,
        imbalance_ratio=masked(peak / mean),
        balancedness=masked(mean / np.where(peak > 0, peak, 1.0)),
        cv=masked(c.std(axis=1) / mean),
        entropy=masked(entropy),
        top1_share=masked(peak / safe_total),
        topk_share=masked(topk / safe_total),
        dead_experts=masked((c == 0).sum(axis=1).astype(np.float64)),
        hot_experts=masked((c > hot_multiple * mean[:, None]).sum(axis=1).astype(np.float64)),
    )


def vllm_balancedness(rank_load: np.ndarray) -> float:
    """vLLM EPLB's `log_balancedness`: sum over layers of the mean rank load / sum over layers of the max
    rank load. rank_load: [layers, ranks]. NaN when nothing was routed."""
    r = np.asarray(rank_load, dtype=np.float64)
    peak = r.max(axis=1).sum()
    return float(r.mean(axis=1).sum() / peak) if peak > 0 else float("nan")


def sglang_balancedness(rank_load: np.ndarray) -> float:
    """SGLang's figure: per layer (mean + 1e-5) / (max + 1e-5) of the rank loads, averaged over layers."""
    r = np.asarray(rank_load, dtype=np.float64)
    if r.size == 0 or r.sum() == 0:
        return float("nan")
    return float(((r.mean(axis=1) + SGLANG_EPS) / (r.max(axis=1) + SGLANG_EPS)).mean())


def rank_imbalance(rank_load: np.ndarray) -> np.ndarray:
    """Per layer max / mean of the EP-rank loads (1 = perfectly balanced ranks); NaN for empty layers."""
    r = np.asarray(rank_load, dtype=np.float64)
    mean = r.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, r.max(axis=1) / np.where(mean > 0, mean, 1), np.nan)
