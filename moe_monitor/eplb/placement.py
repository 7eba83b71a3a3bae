"""Expert placement for expert-parallel load balancing (EPLB): which physical slot serves which logical expert.

A numpy implementation of the placement heuristic DeepSeek published as EPLB (github.com/deepseek-ai/EPLB,
`eplb.py`), written here from the algorithm's description; torch is not needed (the sidecar must run without it).
docs/eplb.md describes the algorithm in words. Three steps per MoE layer:

1. **Groups to nodes.** The logical experts form `num_groups` equal, contiguous groups (DeepSeek-V3's
   group-limited routing). Groups are packed onto the `num_nodes` nodes, the same number on each, heaviest group
   first onto the currently lightest node that still has room.
2. **Replicas within a node.** Each node gets `num_physical / num_nodes` slots. Every logical expert of the node
   has one; each extra slot goes, one at a time, to the expert whose load per replica is currently the highest.
3. **Replicas to GPUs.** Each replica carries its expert's load divided by its replica count; the node's
   replicas are packed onto the node's GPUs, `num_physical / num_gpus` per GPU, heaviest first onto the lightest
   GPU with room.

When `num_groups` is not a multiple of `num_nodes` the same steps run with one group and one node (the global
policy): replicas are chosen over all experts and packed over all GPUs.

Conventions (those of vLLM's and SGLang's EPLB state): physical slots are laid out GPU by GPU, slots
`[g * S, (g + 1) * S)` on GPU `g` with `S = num_physical / num_gpus`; `log2phy[l, e]` lists the slots of logical
expert `e` in ascending order, padded with -1. Ties (equal loads) go to the lowest index, which reproduces the
published example exactly (tests/test_eplb.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from moe_monitor.stats.placement import Placement

__all__ = [
    "Plan",
    "balanced_packing",
    "check_load",
    "log2phy_from_phy2log",
    "plan_placement",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def _count(value: object, name: str, minimum: int = 1) -> int:
    """A whole number >= minimum (bools and floats refused: a mistyped CLI value must not pass as 1 or 0)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_load(load: object, name: str = "load") -> np.ndarray:
    """Validate a load history `[layers, experts]` (finite, >= 0, not all zero) and return it as float64."""
    try:
        w = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric array [layers, experts]") from None
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array [layers, experts], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{name} has NaN or infinite entries")
    if (w < 0).any():
        layer, expert = (int(i) for i in np.argwhere(w < 0)[0])
        raise ValueError(f"{name} is negative at layer {layer}, expert {expert}: loads are assignment counts")
    if w.sum() <= 0:
        raise ValueError(f"{name} is all zero: no routed assignment recorded, nothing to balance")
    return w


def nonnegative_matrix(x: object, name: str, dims: str) -> np.ndarray:
    """x as float64 [rows, columns] with every value finite and >= 0; ValueError naming `name` otherwise."""
    w = np.asarray(x, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array {dims}, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and >= 0")
    return w


def _weights(weight: object) -> np.ndarray:
    """Like check_load, but zero rows and an all-zero matrix are fine (a building block may see them)."""
    return nonnegative_matrix(weight, "weight", "[rows, items]")


def balanced_packing(weight: object, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack the n items of each row into `num_packs` packs of exactly n / num_packs items, balancing pack weight.

    Greedy: items in order of decreasing weight (ties: lower index first), each onto the lightest pack that is
    not yet full (ties: lower pack index). With one item per pack, item i goes to pack i.

    weight: [rows, n]. Returns (pack_index, rank_in_pack), both int64 [rows, n]: the pack of each item and its
    position within the pack (the order in which it was placed there).
    """
    w = _weights(weight)
    num_packs = _count(num_packs, "num_packs")
    rows, n = w.shape
    if n % num_packs:
        raise ValueError(f"{n} items do not split evenly into {num_packs} packs")
    capacity = n // num_packs
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    if capacity == 1:
        pack_index[:] = np.arange(n)
        rank_in_pack[:] = 0
        return pack_index, rank_in_pack
    for row in range(rows):
        pack_load = np.zeros(num_packs)
        filled = np.zeros(num_packs, dtype=np.int64)
        candidate = np.zeros(num_packs)  # a pack's load while it has room, +inf once full
        for item in np.argsort(-w[row], kind="stable"):
            pack = int(np.argmin(candidate))
            pack_index[row, item] = pack
            rank_in_pack[row, item] = filled[pack]
            filled[pack] += 1
            pack_load[pack] += w[row, item]
            candidate[pack] = np.inf if filled[pack] == capacity else pack_load[pack]
    return pack_index, rank_in_pack


def replicate_experts(weight: object, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give `num_physical` slots to the experts of each row: one each, then every extra slot, one at a time, to the
    expert with the highest load per replica (ties: lower index), which minimises the largest per-replica load.

    weight: [rows, num_logical]. Returns int64 arrays (phy2log [rows, num_physical]: the expert in each slot, the
    first num_logical slots being experts 0..num_logical-1; replica_rank [rows, num_physical]: 0 for an expert's
    first slot, 1, 2, ... for its extra ones in the order given; logcnt [rows, num_logical]: replicas per expert).
    """
    w = _weights(weight)
    rows, num_logical = w.shape
    num_physical = _count(num_physical, "num_physical")
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} logical experts")
    phy2log = np.empty((rows, num_physical), dtype=np.int64)
    phy2log[:, :num_logical] = np.arange(num_logical)
    replica_rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, num_logical), dtype=np.int64)
    every_row = np.arange(rows)
    for slot in range(num_logical, num_physical):
        hottest = np.argmax(w / logcnt, axis=1)
        phy2log[:, slot] = hottest
        replica_rank[:, slot] = logcnt[every_row, hottest]
        logcnt[every_row, hottest] += 1
    return phy2log, replica_rank, logcnt


def _check_deployment(num_logical: int, num_physical: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> None:
    if num_gpus > num_physical:
        raise ValueError(f"{num_gpus} GPUs but only {num_physical} physical expert slots: every EP rank needs at "
                         "least one")
    if num_physical < num_logical:
        raise ValueError(f"{num_physical} physical slots cannot hold {num_logical} logical experts")
    if num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical slots ({num_logical} logical + {num_physical - num_logical} "
                         f"redundant) do not split evenly over {num_gpus} GPUs")
    if num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes")
    if num_logical % num_groups:
        raise ValueError(f"{num_logical} experts do not split into {num_groups} equal expert groups")


def rebalance_experts_hierarchical(weight: object, num_physical: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three steps of the module docstring with `num_groups` groups on `num_nodes` nodes.

    Needs num_groups % num_nodes == 0 (use `rebalance_experts` to fall back to the global policy otherwise).
    weight: [layers, num_logical]. Returns int64 (phy2log [layers, num_physical], replica_rank
    [layers, num_physical], logcnt [layers, num_logical]).
    """
    w = _weights(weight)
    layers, num_logical = w.shape
    num_physical = _count(num_physical, "num_physical")
    num_groups = _count(num_groups, "num_groups")
    num_nodes = _count(num_nodes, "num_nodes")
    num_gpus = _count(num_gpus, "num_gpus")
    _check_deployment(num_logical, num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        raise ValueError(f"{num_groups} expert groups do not split evenly over {num_nodes} nodes")
    group_size = num_logical // num_groups
    logical_per_node = num_logical // num_nodes
    physical_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # Step 1: groups onto nodes. A group's place in node-major order is (node, rank within the node); the
    # node's logical experts are its groups' members in that order.
    group_load = w.reshape(layers, num_groups, group_size).sum(axis=2)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_at = np.argsort(group_node * num_groups + group_rank, axis=1, kind="stable")  # [layers, groups]
    members = (group_at[:, :, None] * group_size + np.arange(group_size)).reshape(
        layers * num_nodes, logical_per_node)  # row layer * num_nodes + node: the node's logical experts

    # Step 2: replicas within each node (rows are (layer, node) pairs).
    node_load = np.take_along_axis(w, members.reshape(layers, num_logical), axis=1).reshape(members.shape)
    local_expert, local_rank, local_count = replicate_experts(node_load, physical_per_node)

    # Step 3: the node's replicas onto its GPUs, each replica carrying an equal share of its expert's load.
    replica_load = np.take_along_axis(node_load / local_count, local_expert, axis=1)
    gpu, rank_in_gpu = balanced_packing(replica_load, gpus_per_node)
    position = gpu * slots_per_gpu + rank_in_gpu  # slot within the node, [layers * nodes, physical_per_node]

    rows = np.arange(layers * num_nodes)[:, None]
    phy2log = np.empty((layers * num_nodes, physical_per_node), dtype=np.int64)
    phy2log[rows, position] = np.take_along_axis(members, local_expert, axis=1)
    replica_rank = np.empty_like(phy2log)
    replica_rank[rows, position] = local_rank
    logcnt = np.zeros((layers, num_logical), dtype=np.int64)
    np.put_along_axis(logcnt, members.reshape(layers, num_logical), local_count.reshape(layers, num_logical),
                      axis=1)
    return phy2log.reshape(layers, num_physical), replica_rank.reshape(layers, num_physical), logcnt


def log2phy_from_phy2log(phy2log: np.ndarray, num_logical: int, width: int | None = None) -> np.ndarray:
    """[layers, num_logical, width]: each logical expert's physical slots in ascending order, -1 padded (vLLM's
    `compute_logical_maps` and SGLang's `logical_to_all_physical_map` order). width defaults to the largest
    replica count."""
    p2l = np.asarray(phy2log, dtype=np.int64)
    layers, num_physical = p2l.shape
    counts = np.stack([np.bincount(row, minlength=num_logical) for row in p2l])
    need = int(counts.max())
    width = need if width is None else width
    if width < need:
        raise ValueError(f"width {width} is below the largest replica count {need}")
    out = np.full((layers, num_logical, width), -1, dtype=np.int64)
    for layer in range(layers):
        order = np.argsort(p2l[layer], kind="stable")  # slots grouped by expert, ascending within each
        expert = p2l[layer, order]
        first = np.concatenate(([0], np.cumsum(counts[layer])[:-1]))
        out[layer, expert, np.arange(num_physical) - first[expert]] = order
    return out


@dataclass(frozen=True)
class Plan:
    """A placement the algorithm planned and the deployment it was planned for. `placement` is the placement type
    the sidecar and the plugin split load with (moe_monitor/stats/placement.py): physical slots GPU by GPU over
    `placement.num_ranks` GPUs. `policy` is "hierarchical" or "global"."""

    placement: Placement
    num_logical: int
    num_nodes: int
    num_groups: int
    policy: str

    @property
    def num_redundant(self) -> int:
        return self.placement.num_physical - self.num_logical

    @functools.cached_property
    def logcnt(self) -> np.ndarray:
        """int64 [layers, num_logical]: replicas per expert."""
        return self.placement.replicas(self.num_logical)

    @functools.cached_property
    def log2phy(self) -> np.ndarray:
        """int64 [layers, num_logical, max_replicas]: each expert's slots, ascending, -1 padded."""
        return log2phy_from_phy2log(self.placement.physical_to_logical, self.num_logical)


def rebalance_experts(weight: object, num_physical: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> Plan:
    """The published entry point: hierarchical policy when num_groups % num_nodes == 0, else global (one group,
    one node). weight: the load history [layers, num_logical] (see `check_load`)."""
    w = check_load(weight, "weight")
    num_physical = _count(num_physical, "num_physical")
    num_groups = _count(num_groups, "num_groups")
    num_nodes = _count(num_nodes, "num_nodes")
    num_gpus = _count(num_gpus, "num_gpus")
    _check_deployment(w.shape[1], num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes == 0:
        policy, (phy2log, _, _) = "hierarchical", rebalance_experts_hierarchical(
            w, num_physical, num_groups, num_nodes, num_gpus)
    else:
        policy, (phy2log, _, _) = "global", rebalance_experts_hierarchical(w, num_physical, 1, 1, num_gpus)
    return Plan(placement=Placement(num_gpus, phy2log), num_logical=w.shape[1], num_nodes=num_nodes,
                num_groups=num_groups, policy=policy)


def plan_placement(load: object, *, num_gpus: int, num_redundant: int = 0, num_nodes: int = 1,
                   num_groups: int = 1) -> Plan:
    """The placement for a deployment: `num_gpus` EP ranks on `num_nodes` nodes, `num_redundant` extra physical
    experts per layer (vLLM's `num_redundant_experts`, SGLang's `--ep-num-redundant-experts`), `num_groups`
    expert groups (the model's group-limited routing; 1 for models without it)."""
    w = check_load(load)
    num_redundant = _count(num_redundant, "num_redundant", minimum=0)
    return rebalance_experts(w, w.shape[1] + num_redundant, num_groups, num_nodes, num_gpus)
