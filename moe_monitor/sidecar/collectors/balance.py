"""Balance of the last closed window: per-layer statistics, model-level figures, EP-rank balance."""

from __future__ import annotations

import numpy as np

from moe_monitor.stats.imbalance import rank_imbalance, sglang_balancedness, vllm_balancedness

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector, layer_family

LAYER_STATS = (  # metric, LayerStats field
    ("moe_layer_imbalance_ratio", "imbalance_ratio"), ("moe_layer_balancedness", "balancedness"),
    ("moe_layer_load_cv", "cv"), ("moe_layer_load_entropy", "entropy"), ("moe_layer_top1_share", "top1_share"),
    ("moe_layer_topk_share", "topk_share"), ("moe_layer_dead_experts", "dead_experts"),
    ("moe_layer_hot_experts", "hot_experts"))


def collect(r: Reading) -> list[Family]:
    length = family("moe_window_length_seconds")
    length.add(r.config.window_s)
    window, stats = r.window, r.stats
    if window is None or stats is None:
        return [length]
    ids = window.layer_ids
    out = [layer_family("moe_layer_window_routed_tokens", ids, stats.tokens.astype(np.int64))]
    out += [layer_family(name, ids, getattr(stats, field)) for name, field in LAYER_STATS]
    if r.window_rank_load is not None:
        out.append(layer_family("moe_layer_ep_rank_imbalance_ratio", ids, rank_imbalance(r.window_rank_load)))
    end = family("moe_window_end_timestamp_seconds")
    end.add(window.end)
    tokens = family("moe_window_routed_tokens")
    tokens.add(int(stats.tokens.sum()))
    out += [length, end, tokens]
    ratio = stats.imbalance_ratio
    if not np.isnan(ratio).all():
        worst = int(np.nanargmax(ratio))
        f = family("moe_worst_layer_imbalance_ratio")
        f.add(float(ratio[worst]), [("layer", int(ids[worst]))])
        m = family("moe_mean_layer_imbalance_ratio")
        m.add(float(np.nanmean(ratio)))
        out += [f, m]
    if r.window_rank_load is not None:
        v = family("moe_eplb_balancedness_vllm")
        v.add(vllm_balancedness(r.window_rank_load))
        s = family("moe_eplb_balancedness_sglang")
        s.add(sglang_balancedness(r.window_rank_load))
        out += [v, s]
    return out


COLLECTOR = Collector("balance", "t0", collect)
