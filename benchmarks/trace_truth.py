"""Labelled truth for the breakdown (issue #25, part 3): which module or routing step launched each kernel.

An eager vLLM run (`benchmarks/truth_ranges.py` installed in-process) opens a `record_function` range
`moe_truth::<role>:<where>` around every module with a role (the router's linear, the MoE layer, shared experts,
attention, norms, linears, the logits and the sampler) and around the MoE layer's routing, align and combine
functions and moe-monitor's recorder. The profiler then records, on the host, each kernel's launch inside those
ranges; the kernel and its launch share a correlation id. A kernel's role is decided from the ranges open at its
launch:

1. an override, the first of OVERRIDES open at any depth (monitoring, a shared expert's gate, shared experts,
   routing, the router's linear): what runs inside them is theirs whatever module it passes through;
2. else the innermost range with a role;
3. else `outside` (the model runner's input preparation and bookkeeping, outside the model and the sampler).

Copies and memsets are `memory` wherever they ran. ROLE_CATEGORY maps roles to the breakdown's rows.

    python benchmarks/trace_truth.py TRACE.pt.trace.json.gz [--contexts OUT.json.gz]   # shares (+ contexts)
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

PREFIX = "moe_truth::"
DEVICE = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH = ("cuda_runtime", "cuda_driver")
OVERRIDES = ("monitoring", "shared_expert_gate", "shared_experts", "routing", "router_linear")
ROLE_CATEGORY = {
    "monitoring": "monitoring",
    "shared_expert_gate": "experts",  # the shared expert's own sigmoid gate scales its output: not routing
    "shared_experts": "experts",
    "routing": "gate",  # the router's select_experts: softmax/sigmoid, top-k, grouped top-k, bias, renormalise
    "router_linear": "gate",
    "align": "align_permute",  # moe_align_block_size and the modular kernel's prepare step
    "combine": "align_permute",  # moe_sum and the modular kernel's finalize step
    "moe_block": "align_permute",  # the MoE block outside router/experts: shared + routed output combine
    "moe": "experts",  # the MoE layer outside the above: expert GEMMs, activation, workspace
    "attention": "attention",
    "rotary": "attention",
    "norm": "norm_elementwise",
    "embed": "norm_elementwise",
    "layer": "norm_elementwise",  # a decoder layer outside its modules: residual adds, activations
    "model": "norm_elementwise",  # the model outside its layers (embedding scale, ...)
    "linear": "dense_gemm",
    "logits": "sampling",
    "sampler": "sampling",
    "outside": "outside",
}


def range_name(role: str, where: str) -> str:
    return f"{PREFIX}{role}:{where}"


def decide(roles: tuple[str, ...]) -> str:
    """roles: outermost first."""
    for role in OVERRIDES:
        if role in roles:
            return role
    for role in reversed(roles):
        if role in ROLE_CATEGORY:
            return role
    return "outside"


def contexts(doc: dict) -> dict:
    """Each device event of a full (CPU + CUDA) trace with the truth ranges open at its launch.

    Returns {"names": [...], "stacks": [...], "events": [[ts, dur, name_idx, cat, stream, stack_idx], ...]} with
    stacks as lists of range names (outermost first), events in trace order."""
    events = doc["traceEvents"]
    launches = {}
    ranges = defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if cat in LAUNCH and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["pid"], e["tid"], e["ts"])
        elif cat == "user_annotation" and e.get("name", "").startswith(PREFIX):
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
    stack_at = open_ranges_at(launches, ranges)
    names: dict[str, int] = {}
    stacks: dict[tuple, int] = {(): 0}
    out = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in DEVICE:
            continue
        stack = stack_at.get(e.get("args", {}).get("correlation"), ())
        out.append([e["ts"], e["dur"], names.setdefault(e["name"], len(names)), e["cat"],
                    e.get("args", {}).get("stream", e.get("tid")), stacks.setdefault(stack, len(stacks))])
    return {"names": list(names), "stacks": [list(s) for s in stacks], "events": out}


def open_ranges_at(launches: dict, ranges: dict) -> dict:
    """correlation -> the truth ranges open on the launching thread at the launch (a sweep: ranges nest)."""
    by_thread = defaultdict(list)
    for corr, (pid, tid, ts) in launches.items():
        by_thread[(pid, tid)].append((ts, corr))
    out = {}
    for thread, points in by_thread.items():
        spans = sorted(ranges.get(thread, ()), key=lambda r: (r[0], -r[1]))
        open_: list[tuple] = []
        i = 0
        for ts, corr in sorted(points):
            while i < len(spans) and spans[i][0] <= ts:
                open_.append(spans[i])
                i += 1
            open_ = [r for r in open_ if r[1] >= ts]
            if open_:
                out[corr] = tuple(r[2] for r in sorted(open_, key=lambda r: (r[0], -r[1])))
    return out


def role_of_range(name: str) -> str:
    return name[len(PREFIX):].split(":", 1)[0]


def labels(ctx: dict) -> list[str]:
    """The role of each event of `contexts(...)`, in its order (`memory` for copies and memsets)."""
    roles = [decide(tuple(role_of_range(n) for n in stack)) for stack in ctx["stacks"]]
    return ["memory" if cat != "kernel" else roles[stack] for _, _, _, cat, _, stack in ctx["events"]]


def shares(ctx: dict) -> dict:
    """Truth per breakdown row: {"total_us", "categories": {row: {"us", "share"}}, "roles": {role: us}}."""
    by_cat: dict[str, float] = defaultdict(float)
    by_role: dict[str, float] = defaultdict(float)
    for (_, dur, *_), role in zip(ctx["events"], labels(ctx)):
        by_role[role] += dur
        by_cat[ROLE_CATEGORY.get(role, role)] += dur
    total = sum(by_cat.values())
    return {"total_us": total,
            "categories": {c: {"us": us, "share": us / total if total else 0.0} for c, us in
                           sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "roles": dict(sorted(by_role.items(), key=lambda kv: -kv[1]))}


def _keys(prev: str, name: str, nxt: str) -> tuple[tuple, ...]:
    """The keys a kernel's split is looked up by, most specific first: its name between its neighbours on its
    stream, with one neighbour, alone."""
    return ("around", prev, name, nxt), ("after", prev, name), ("before", name, nxt), ("name", name)


def _with_neighbours(kernels: list[tuple[str, object, float]]) -> list[tuple[tuple, ...]]:
    """kernels: (name, stream, ts) in any order; the lookup keys of each, in the same order."""
    order = sorted(range(len(kernels)), key=lambda i: (str(kernels[i][1]), kernels[i][2]))
    keys: list[tuple] = [()] * len(kernels)
    streams = [kernels[i][1] for i in order]
    for k, i in enumerate(order):
        prev = kernels[order[k - 1]][0] if k > 0 and streams[k - 1] == streams[k] else ""
        nxt = kernels[order[k + 1]][0] if k + 1 < len(order) and streams[k + 1] == streams[k] else ""
        keys[i] = _keys(prev, kernels[i][0], nxt)
    return keys


def name_fractions(ctx: dict) -> dict[tuple, dict[str, float]]:
    """The share of each kernel's time in each row (from an eager labelled run), keyed by its name between its
    neighbours on its stream, by its name with one neighbour, and by its name alone: a graph replay launches the
    same kernels in the same order inside vLLM's custom ops, so a generic kernel (`direct_copy_kernel_cuda`) takes
    the split of the place it ran in, not of every place its name ran."""
    per: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    kernels = [(ctx["names"][name], stream, ts) for ts, _, name, cat, stream, _ in ctx["events"] if cat == "kernel"]
    durs = [(dur, role) for (_, dur, _, cat, _, _), role in zip(ctx["events"], labels(ctx)) if cat == "kernel"]
    for keys, (dur, role) in zip(_with_neighbours(kernels), durs):
        for key in keys:
            per[key][ROLE_CATEGORY.get(role, role)] += dur
    return {k: {c: us / sum(v.values()) for c, us in v.items()} for k, v in per.items() if sum(v.values()) > 0}


def transfer(fractions: dict[tuple, dict[str, float]], device_events: list[dict]) -> dict:
    """Truth for a trace without launch ranges (CUDA-graph replays) from an eager labelled run of the same model
    and workload: each kernel's time split as the eager run split the most specific key it shares with it
    (`name_fractions`); copies and memsets `memory`; names the eager run never launched (inductor's fused
    kernels) `unseen`."""
    by_cat: dict[str, float] = defaultdict(float)
    unseen: dict[str, float] = defaultdict(float)
    kernels = [e for e in device_events if e["cat"] == "kernel"]
    keys = iter(_with_neighbours([(e["name"], e.get("stream", 0), e.get("ts", i)) for i, e in enumerate(kernels)]))
    for e in device_events:
        if e["cat"] != "kernel":
            by_cat["memory"] += e["dur"]
            continue
        split = next((fractions[k] for k in next(keys) if k in fractions), None)
        if split is None:
            by_cat["unseen"] += e["dur"]
            unseen[e["name"]] += e["dur"]
        else:
            for cat, f in split.items():
                by_cat[cat] += e["dur"] * f
    total = sum(by_cat.values())
    return {"total_us": total,
            "categories": {c: {"us": us, "share": us / total if total else 0.0} for c, us in
                           sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "unseen_top": sorted(unseen.items(), key=lambda kv: -kv[1])[:10]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--contexts", help="write the per-event contexts here (.json.gz)")
    args = ap.parse_args()
    with gzip.open(args.trace) if args.trace.endswith(".gz") else open(args.trace) as f:
        ctx = contexts(json.load(f))
    if args.contexts:
        with gzip.open(args.contexts, "wt") as f:
            json.dump(ctx, f, separators=(",", ":"))
    print(json.dumps(shares(ctx), indent=1))


if __name__ == "__main__":
    main()
