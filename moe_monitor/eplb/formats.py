"""Placement files for the servers that can take one, and for moe-monitor's own sidecar. docs/eplb.md says which
flag reads which file; what each server accepts was checked in its source (SGLang
`python/sglang/srt/eplb/expert_location.py`, vLLM 0.26 and 0.32 `vllm/config/parallel.py` and
`vllm/distributed/eplb/eplb_state.py`).

- **SGLang** `--init-expert-location FILE.json` (`compute_initial_expert_location_metadata`) takes either
  `{"physical_to_logical_map": [[...]]}` (the placement, used as is: `init_by_mapping`) or
  `{"logical_count": [[...]]}` (a load history; SGLang runs its own EPLB at start-up: `init_by_eplb`). The
  mapping file must hold that one key and nothing else: SGLang passes the dict as keyword arguments to
  `init_by_mapping(server_args, model_config, physical_to_logical_map)`, so any other key is a TypeError at
  start-up. Rows are indexed by the model's layer id over ALL `num_hidden_layers` decoder layers (SGLang's
  `ModelConfigForExpertLocation.num_layers`), dense layers included, so a model whose first layers are dense
  (DeepSeek's `first_k_dense_replace`) needs `moe_layer_ids`; the dense rows get SGLang's trivial map.
- **vLLM** has no way to load a placement or a load history (no such field in `EPLBConfig` or
  `ParallelConfig` in 0.26 or 0.32; `expert_placement_strategy` only picks "linear" or "round_robin"). vLLM
  computes the placement itself, at run time, with the same algorithm, from its own sliding window of load;
  what it takes from us is the number of redundant experts: `--enable-eplb --eplb-config
  '{"num_redundant_experts": R}'`. `vllm_eplb_state` writes the maps vLLM's EPLB state holds
  (`EplbModelState.physical_to_logical_map`, `logical_to_physical_map`, `logical_replica_count`) for reading
  and comparison only: no vLLM flag loads that file.
- **moe-monitor's sidecar** `--placement FILE` (moe_monitor/stats/placement.py): `{"num_ranks": W,
  "physical_to_logical": [[...]]}` per MoE layer, so the dashboards show per-rank load under the placement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import numpy as np

from moe_monitor.eplb.placement import Plan, _count, check_load

__all__ = [
    "FILE_NAMES",
    "sglang_init_expert_location",
    "sglang_logical_count",
    "sidecar_placement",
    "vllm_args",
    "vllm_eplb_state",
    "write_json",
    "write_placement_files",
]

FILE_NAMES = {
    "sglang_init_expert_location": "sglang_init_expert_location.json",
    "sglang_logical_count": "sglang_logical_count.json",
    "vllm_eplb_state": "vllm_eplb_state.json",
    "sidecar_placement": "moe_monitor_placement.json",
}


def _layer_rows(num_moe_layers: int, num_hidden_layers: int | None,
                moe_layer_ids: Sequence[int] | None) -> tuple[int, np.ndarray]:
    """(rows in the model-wide map, the row of each MoE layer)."""
    if moe_layer_ids is None:
        if num_hidden_layers is not None and _count(num_hidden_layers, "num_hidden_layers") != num_moe_layers:
            raise ValueError(f"the model has {num_hidden_layers} layers but the load history {num_moe_layers} MoE "
                             "layers: give moe_layer_ids, the model layer id of each MoE layer")
        return num_moe_layers, np.arange(num_moe_layers)
    ids = list(moe_layer_ids)
    if any(isinstance(i, bool) or not isinstance(i, Integral) for i in ids):
        raise ValueError("moe_layer_ids must be integers")
    if len(ids) != num_moe_layers:
        raise ValueError(f"{len(ids)} moe_layer_ids for {num_moe_layers} MoE layers")
    if ids[0] < 0 or any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError("moe_layer_ids must be >= 0 and strictly increasing")
    rows = ids[-1] + 1 if num_hidden_layers is None else _count(num_hidden_layers, "num_hidden_layers")
    if ids[-1] >= rows:
        raise ValueError(f"moe layer id {ids[-1]} is past the model's {rows} layers")
    return rows, np.asarray(ids, dtype=np.int64)


def sglang_init_expert_location(plan: Plan, *, num_hidden_layers: int | None = None,
                                moe_layer_ids: Sequence[int] | None = None) -> dict:
    """`{"physical_to_logical_map": [num_hidden_layers][num_physical]}` for SGLang's `--init-expert-location`.

    Without moe_layer_ids every model layer is taken to be a MoE layer (Qwen3-MoE, Mixtral, ...). Dense layers
    get SGLang's trivial map (`init_trivial`: slot i holds expert i % E). Start SGLang with
    `--ep-num-redundant-experts` = plan.num_redundant and an EP size of plan.placement.num_ranks."""
    placement = plan.placement
    rows, ids = _layer_rows(placement.num_layers, num_hidden_layers, moe_layer_ids)
    full = np.tile(np.arange(placement.num_physical) % plan.num_logical, (rows, 1))
    full[ids] = placement.physical_to_logical
    return {"physical_to_logical_map": full.tolist()}


def _numbers(a: np.ndarray) -> list:
    """Integral loads as ints (SGLang's own dumps are integer counts), others as floats."""
    return a.astype(np.int64).tolist() if np.all(a == np.round(a)) else a.tolist()


def sglang_logical_count(load: object, *, num_hidden_layers: int | None = None,
                         moe_layer_ids: Sequence[int] | None = None) -> dict:
    """`{"logical_count": [num_hidden_layers][E]}` for SGLang's `--init-expert-location`: SGLang then computes
    the placement itself at start-up (its `--eplb-algorithm`, `--ep-num-redundant-experts`, `--nnodes`). Dense
    layers get zero rows."""
    w = check_load(load)
    rows, ids = _layer_rows(w.shape[0], num_hidden_layers, moe_layer_ids)
    full = np.zeros((rows, w.shape[1]))
    full[ids] = w
    return {"logical_count": _numbers(full)}


def vllm_args(num_redundant: int) -> list[str]:
    """The vLLM flags that apply a number of redundant experts (vLLM then places experts itself)."""
    r = _count(num_redundant, "num_redundant", minimum=0)
    return ["--enable-expert-parallel", "--enable-eplb", "--eplb-config", json.dumps({"num_redundant_experts": r})]


def vllm_eplb_state(plan: Plan) -> dict:
    """The maps vLLM's EPLB state would hold for this placement, under vLLM's names (EplbModelState), with the
    flags that make vLLM compute its own. NOT loadable by vLLM: see the module docstring."""
    return {
        "format": "moe-monitor vllm-eplb-state 1",
        "loadable": False,
        "note": ("vLLM's EplbModelState maps for this placement, for reading and comparison; vLLM (0.26, 0.32) "
                 "has no option to load a placement: it computes one at run time with the same algorithm from "
                 "its own load window. Apply the redundant-expert count with vllm_args. vLLM pads "
                 "logical_to_physical_map with -1 to 1024 columns internally; here it is padded to the largest "
                 "replica count."),
        "vllm_args": vllm_args(plan.num_redundant),
        "num_moe_layers": plan.placement.num_layers,
        "num_logical_experts": plan.num_logical,
        "num_physical_experts": plan.placement.num_physical,
        "num_redundant_experts": plan.num_redundant,
        "ep_size": plan.placement.num_ranks,
        "num_nodes": plan.num_nodes,
        "num_expert_groups": plan.num_groups,
        "policy": plan.policy,
        "physical_to_logical_map": plan.placement.physical_to_logical.tolist(),
        "logical_to_physical_map": plan.log2phy.tolist(),
        "logical_replica_count": plan.logcnt.tolist(),
    }


def sidecar_placement(plan: Plan) -> dict:
    """moe-monitor's own `--placement` file (moe_monitor/stats/placement.py): one map per MoE layer."""
    return {"num_ranks": plan.placement.num_ranks, "physical_to_logical": plan.placement.physical_to_logical.tolist()}


def write_json(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    tmp.replace(path)
    return path


def write_placement_files(out_dir: str | Path, plan: Plan, load: object | None = None, *,
                          num_hidden_layers: int | None = None,
                          moe_layer_ids: Sequence[int] | None = None) -> dict[str, Path]:
    """Write every format (FILE_NAMES) into out_dir; the SGLang logical_count file only when `load` is given.
    Returns {format: path}."""
    out = Path(out_dir)
    docs = {
        "sglang_init_expert_location": sglang_init_expert_location(
            plan, num_hidden_layers=num_hidden_layers, moe_layer_ids=moe_layer_ids),
        "vllm_eplb_state": vllm_eplb_state(plan),
        "sidecar_placement": sidecar_placement(plan),
    }
    if load is not None:
        w = check_load(load)
        if w.shape != plan.logcnt.shape:
            raise ValueError(f"load has shape {w.shape}, the placement is for {plan.logcnt.shape}")
        docs["sglang_logical_count"] = sglang_logical_count(w, num_hidden_layers=num_hidden_layers,
                                                            moe_layer_ids=moe_layer_ids)
    return {name: write_json(out / FILE_NAMES[name], doc) for name, doc in docs.items()}
