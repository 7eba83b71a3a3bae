"""From a `benchmarks/vllm_trace_matrix.py` run (its matrix.tar.gz unpacked) to the committed fixtures, their
labelled truth and the table of what `moe-monitor analyze` says on each today (issue #25, part 3).

    python benchmarks/trace_matrix_report.py RUN_DIR --gpu h100 --device "..." --device-time "..."

writes tests/fixtures/traces/vllm026_<arch>_<mode>_<run>.pt.trace.json.gz (fixtures under 1.5 MB),
tests/fixtures/vllm026_matrix_truth.json.gz and benchmarks/results/trace_matrix_<gpu>.md.

Truth of an eager fixture: its own kernels' labels (`trace_truth.labels`), stored per device event in
`read_trace` order (run-length encoded). Truth of a graph fixture: `trace_truth.transfer` from the eager run of the
same architecture and workload (each kernel's time split as its name's time is split in the eager run).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_truth import ROLE_CATEGORY, labels, name_fractions, shares, transfer  # noqa: E402
from vllm_trace_matrix import ARCHS  # noqa: E402

from moe_monitor.breakdown.analyze import analyze  # noqa: E402
from moe_monitor.breakdown.trace import read_trace  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "traces")
TRUTH = os.path.join(os.path.dirname(FIXTURES), "vllm026_matrix_truth.json.gz")
MAX_FIXTURE = 1_500_000
ROWS = ("gate", "experts", "align_permute", "attention", "dense_gemm", "norm_elementwise", "sampling", "memory",
        "monitoring", "other")


def parse(name: str) -> tuple[str, str, str]:
    """vllm026_<arch>_<mode>_<run> -> (arch, mode, run)."""
    stem = name.split(".")[0][len("vllm026_"):]
    arch, mode, run = stem.rsplit("_", 2)
    return arch, mode, run


def rle(seq: list[str]) -> list[list]:
    out: list[list] = []
    for x in seq:
        if out and out[-1][0] == x:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


def unrle(runs: list[list]) -> list[str]:
    return [x for x, n in runs for _ in range(n)]


def fixture_labels(ctx: dict, fixture: str) -> list[str]:
    """Each device event of the fixture (read_trace order) with its truth row."""
    by_key: dict[tuple, list[str]] = defaultdict(list)
    for (ts, _, name, *_), role in zip(ctx["events"], labels(ctx)):
        by_key[(ts, ctx["names"][name])].append(ROLE_CATEGORY.get(role, role))
    out = []
    for e in read_trace(fixture).device:
        out.append(by_key[(e.ts, e.name)].pop(0))
    return out


def truth_of(run_dir: str) -> dict:
    out = {}
    contexts = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "contexts", "*.contexts.json.gz"))):
        with gzip.open(path) as f:
            contexts[os.path.basename(path).split(".")[0]] = json.load(f)
    for path in sorted(glob.glob(os.path.join(run_dir, "fixtures", "*.pt.trace.json.gz"))):
        name = os.path.basename(path).split(".")[0]
        arch, mode, run = parse(name)
        shape, layers, *_ = ARCHS[arch]
        meta = {"arch": arch, "checkpoint_shape": shape, "layers": layers, "mode": mode, "run": run}
        eager = f"vllm026_{arch}_eager_{run}"
        if mode == "eager" and name in contexts:
            s = shares(contexts[name])
            total = s["total_us"]
            out[name] = {**meta, "source": "labelled", "total_us": total,
                         "categories": {c: v["share"] for c, v in s["categories"].items()},
                         "roles": {r: us / total for r, us in s["roles"].items()},
                         "labels": rle(fixture_labels(contexts[name], path))}
        elif mode == "graphs" and eager in contexts:
            trace = read_trace(path)
            t = transfer(name_fractions(contexts[eager]),
                         [{"name": e.name, "cat": e.cat, "dur": e.dur, "stream": e.stream, "ts": e.ts}
                          for e in trace.device])
            out[name] = {**meta, "source": f"transferred from {eager}", "total_us": t["total_us"],
                         "categories": {c: v["share"] for c, v in t["categories"].items()},
                         "unseen_top": [[n, us / t["total_us"]] for n, us in t["unseen_top"]]}
    return out


def today(path: str) -> dict:
    result = analyze([read_trace(path)], top=100000)
    other = [(t.name, t.share) for t in result.top if t.category == "other"]
    return {"categories": {c: v.share for c, v in result.categories.items()}, "other_top": other[:5],
            "total_us": result.total_us}


def gate_elsewhere(path: str, runs: list[list]) -> dict:
    """Where analyze puts the kernels the truth calls gate (eager fixtures): row -> share of the trace."""
    from moe_monitor.breakdown.analyze import classify, load_rules, units_of

    trace = read_trace(path)
    units = units_of(trace)
    classify(trace, units, load_rules())
    total = sum(u.us for u in units)
    out: dict[str, float] = defaultdict(float)
    for u, truth in zip(units, unrle(runs)):
        if truth == "gate":
            out[u.category] += u.us / total
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def short(name: str, n: int = 48) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def table(truth: dict, run_dir: str) -> tuple[list[str], dict]:
    lines = ["| fixture | truth gate | analyze gate | Δ gate | analyze other | top kernels in `other` (share) | "
             "truth experts / analyze |",
             "|---|---|---|---|---|---|---|"]
    measured = {}
    for name in sorted(truth):
        path = os.path.join(run_dir, "fixtures", f"{name}.pt.trace.json.gz")
        t, now = truth[name], today(path)
        measured[name] = now
        tg, ag = t["categories"].get("gate", 0.0), now["categories"]["gate"]
        others = ", ".join(f"`{short(n)}` {pct(s)}" for n, s in now["other_top"][:3]) or "–"
        lines.append(f"| {name[len('vllm026_'):]} | {pct(tg)} | {pct(ag)} | {100 * (ag - tg):+.1f} | "
                     f"{pct(now['categories']['other'])} | {others} | {pct(t['categories'].get('experts'))} / "
                     f"{pct(now['categories']['experts'])} |")
        if t["source"] == "labelled":
            now["truth_gate_in"] = gate_elsewhere(path, t["labels"])
    return lines, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--gpu", required=True, help="h100 or h200: the results file's suffix")
    ap.add_argument("--device", default="", help="the device line of the run (GPU, driver)")
    ap.add_argument("--device-time", default="", help="device time the call used")
    ap.add_argument("--no-copy", action="store_true", help="only print the table")
    args = ap.parse_args()
    truth = truth_of(args.run_dir)
    lines, measured = table(truth, args.run_dir)
    print("\n".join(lines))
    if args.no_copy:
        return
    for name in truth:
        src = os.path.join(args.run_dir, "fixtures", f"{name}.pt.trace.json.gz")
        if os.path.getsize(src) < MAX_FIXTURE:
            shutil.copy(src, os.path.join(FIXTURES, os.path.basename(src)))
    with gzip.open(TRUTH, "wt", compresslevel=9) as f:
        json.dump({"vllm": "0.26.0", "device": args.device, "fixtures": truth}, f, separators=(",", ":"))
    with open(os.path.join(ROOT, "benchmarks", "results", f"trace_matrix_{args.gpu}.md"), "w") as f:
        f.write("\n".join(markdown(args, truth, lines, measured, run_log(args.run_dir))) + "\n")


def run_log(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "results.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def markdown(args, truth: dict, lines: list[str], measured: dict, log: list[dict]) -> list[str]:
    failed = [r for r in log if "error" in r and "job" in r]
    out = [f"# Trace matrix on {args.gpu.upper()} (issue #25 part 3): labelled truth vs `moe-monitor analyze`", "",
           f"Device: {args.device}. Device time: {args.device_time}. vLLM 0.26, `benchmarks/vllm_trace_matrix.py`, "
           "`benchmarks/trace_matrix_report.py`; how the truth is labelled: docs/breakdown.md, \"Architectures and "
           "their labelled truth\" (eager: each kernel's own label; graphs: transferred from the eager run).", "",
           *lines, "", "## Where analyze puts the truth's gate (eager fixtures, share of the trace)", ""]
    for name, now in sorted(measured.items()):
        if "truth_gate_in" in now:
            rows = ", ".join(f"{c} {pct(v)}" for c, v in now["truth_gate_in"].items())
            out.append(f"- {name[len('vllm026_'):]}: {rows}")
    out += ["", "## Graph fixtures: time the transfer could not attribute (`unseen`)", ""]
    for name, t in sorted(truth.items()):
        if t["source"] != "labelled":
            top = ", ".join(f"`{short(n)}` {pct(v)}" for n, v in t["unseen_top"][:3])
            out.append(f"- {name[len('vllm026_'):]}: {pct(t['categories'].get('unseen', 0.0))} ({top or '–'})")
    out += ["", "## Engines that did not run", ""]
    out += [f"- {r['job']}: {r['error']}" for r in failed] or ["- none"]
    return out


if __name__ == "__main__":
    main()
