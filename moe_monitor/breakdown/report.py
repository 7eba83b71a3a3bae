"""Text table of a breakdown (the JSON form is analyze()'s dict itself)."""

from __future__ import annotations

from .straggler import render as render_ep_wait
from .straggler import render_kinds as render_collective_wait


def _pct(x: float) -> str:
    return f"{100 * x:5.1f} %"


def render_table(result: dict, top: int = 15) -> str:
    total = result["total_us"]
    lines = [f"device time {total / 1000:.3f} ms in {len(result['ranks'])} trace(s), "
             f"{len(result['steps'])} engine step(s); "
             f"idle between kernels inside steps {result['idle_us'] / 1000:.3f} ms",
             "", f"{'category':18s} {'ms':>10s} {'share':>8s}"]
    for cat, row in sorted(result["categories"].items(), key=lambda kv: -kv[1]["us"]):
        if row["us"]:
            lines.append(f"{cat:18s} {row['us'] / 1000:10.3f} {_pct(row['share']):>8s}")
    if result["idle_us"]:
        idle_share = result["idle_us"] / (total + result["idle_us"])
        lines.append(f"{'(idle)':18s} {result['idle_us'] / 1000:10.3f} {_pct(idle_share):>8s}"
                     "  of busy + idle")
    if len(result["ranks"]) > 1:
        lines += ["", "per rank:"] + [
            f"  {r['rank']:24s} {r['total_us'] / 1000:10.3f} ms  idle {r['idle_us'] / 1000:.3f} ms"
            for r in result["ranks"]]
    if result["phases"]:
        lines += ["", "per phase (ms):"]
        for phase, cats in result["phases"].items():
            body = ", ".join(f"{c} {v / 1000:.3f}" for c, v in sorted(cats.items(), key=lambda kv: -kv[1]) if v)
            lines.append(f"  {phase:8s} {body}")
    blocks = result["moe_blocks"]
    if blocks["count"]:
        lines += ["", f"MoE pre-amble per layer (mean of {blocks['count']} MoE blocks): norm→first expert GEMM "
                  f"{blocks['preamble_us']:.1f} us (gate GEMM {blocks['gate_us']:.1f} us) vs first expert GEMM "
                  f"{blocks['first_expert_us']:.1f} us, all expert kernels {blocks['experts_us']:.1f} us"]
    by_tokens = result.get("moe_blocks_by_tokens") or {}
    if len(by_tokens) > 1 or (by_tokens and not blocks["count"]):
        lines += ["", "MoE pre-amble per layer by tokens per step (vLLM steps):"] + [
            f"  {bucket:>7s} tokens: {b['count']:5d} blocks, pre-amble {b['preamble_us']:.1f} us "
            f"(gate GEMM {b['gate_us']:.1f} us) vs first expert GEMM {b['first_expert_us']:.1f} us, "
            f"all expert kernels {b['experts_us']:.1f} us" for bucket, b in by_tokens.items()]
    if result["expert_tokens"]:
        lines += ["", "expert time by tokens per call: " + ", ".join(
            f"{b}: {us / 1000:.3f} ms" for b, us in result["expert_tokens"].items())]
    lines += render_collective_wait(result.get("collective_wait"))
    lines += render_ep_wait(result.get("ep_wait"))
    lines += render_unplaced(result)
    lines += ["", f"{'top kernels / ops':60s} {'category':16s} {'calls':>6s} "
                  f"{'total ms':>9s} {'mean us':>8s} {'share':>7s}"]
    for row in result["top"][:top]:
        name = row["name"] if len(row["name"]) <= 60 else row["name"][:57] + "..."
        lines.append(f"{name:60s} {row['category']:16s} {row['count']:6d} {row['total_us'] / 1000:9.3f} "
                     f"{row['mean_us']:8.1f} {_pct(row['share']):>7s}")
    return "\n".join(lines)


HOW_TO_PLACE = ("  to place one: `moe-monitor analyze --print-rules > rules.toml`, add a [[category]] whose pattern "
                "matches it\n  (before the catch-all rows), then `moe-monitor analyze --rules rules.toml ...` "
                "(docs/breakdown.md, \"Adding a rule\")")


def render_unplaced(result: dict) -> list[str]:
    """What no rule or position placed: its share, the kernels, and how to add a rule."""
    other = result["categories"].get("other", {"us": 0.0, "share": 0.0})
    rows = result.get("unplaced") or []
    if not other["us"] or not rows:
        return []
    lines = ["", f"not placed (in `other`): {_pct(other['share']).strip()} of device time; "
                 f"the top {len(rows)} kernel(s) / op(s):"]
    for row in rows:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        lines.append(f"  {_pct(row['share'])} {row['count']:7d} calls  {name}")
    return lines + HOW_TO_PLACE.split("\n")
