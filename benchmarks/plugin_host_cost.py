"""The plugin's host work per vLLM step on real GPU vLLM (issue #27): per hook, on against off in one engine, and
the plugin's step time against the profiler's.

One offline engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the worker's hooks run here), the plugin
on, `load_format="dummy"`, a real checkpoint's per-layer dimensions (benchmarks/vllm_cost.py's shapes) with
`--layers` of them, vLLM's default CUDA graphs (or `--eager`). Decode of OUT tokens after PROMPT-token prompts,
greedy, after a warm-up generate of the same shape. Three passes over one engine:

1. `--hooks B,..`: each hook of the plugin wrapped with a `perf_counter_ns` pair (the wrapper's own cost, measured on
   a no-op, is printed, not subtracted): `WorkerMonitor.step_begin / forward_done / step_end` (vLLM's worker thread,
   every step; forward_done only where the plugin zeroes its count after each forward), `Tap.__call__` (each MoE
   layer's tap: eager mode only, under CUDA graphs nothing of it runs on the host), and nested in those
   `Recorder.set_valid_tokens / record / flush`; `Publisher.publish_once` (the publisher thread, GIL held). The
   hooks' sum per step against the step's host wall time.
2. `--ab B,..`: the same engine with the hooks on and off, `--rounds` rounds, each round running `on`, `off` and
   `off2` (an A/A: off again) in a rotated order; per round ms per output token (generate wall time / OUT). Off
   means the worker's monitor is detached (`worker._moe_monitor = None`: vLLM's own methods run, behind the
   wrappers' one attribute read); the counting kernel inside the CUDA graphs runs in both.
3. `--trace S,..`: a workload with prefill, mixed and decode steps inside `start_profile`/`stop_profile`, once per
   stride S: every S-th step timed (1: every step, each taking the previous end event as its start; 2: every
   other step, each recording its own start, as a sampled step does); every step the plugin counts is logged with
   the timed ones' seconds, aligned with the trace's steps (benchmarks/trace_steps.py) by their token counts, and
   the timed ones compared per phase.
4. `--every N,..`: the hooks pass once per N (time a pseudo-random 1 in N steps, the plugin's StepSampler), the
   on/off pass at the first N.

    . .gpu/device-env.sh; python3 benchmarks/plugin_host_cost.py --out $OUT/host_cost.jsonl --hooks 1,8,32,128 \
        --every 16,1 --ab 1,8,32 --trace 1,2

It runs the plugin on PYTHONPATH: point that at another checkout to measure another version in the same call.

`--publisher LxE` (no GPU, no vLLM): the publisher's `publish_once` alone at L layers x E experts (part 2's shape:
61x256), a real SegmentWriter into a temporary directory, the CPU recorder's counts; the time it holds the GIL is its
wall time (it is Python and numpy on one thread, with no I/O wait: the segment is a shared-memory file).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402
from vllm_cost import SHAPES, write_model  # noqa: E402
from vllm_traces import prompts_of  # noqa: E402

SAMPLES: dict[str, list[int]] = defaultdict(list)  # hook -> ns per call
PER_STEP = ("WorkerMonitor.step_begin", "WorkerMonitor.forward_done", "WorkerMonitor.step_end", "Tap.__call__")


def timed(name: str, fn):
    return timing.timed(name, fn, lambda key, ns: SAMPLES[key].append(ns))


def hook_sites(fine: bool = False):
    from moe_monitor.plugin import attach, cuda_driver, publisher, recorder, step_timer, steps, worker

    sites = ((worker.WorkerMonitor, ("step_begin", "forward_done", "step_end")), (attach.Tap, ("__call__",)),
             (recorder.Recorder, ("set_valid_tokens", "record", "flush")), (publisher.Publisher, ("publish_once",)))
    if fine:  # what the hooks spend their time on (nested in the hooks' own figures)
        sites += ((step_timer.DriverEvents, ("record",)), (cuda_driver.Driver, ("write_u64",)),
                  (step_timer.CudaEventTimer, ("begin", "end", "poll")), (steps.StepStats, ("step", "record")),
                  (worker, ("prefill_tokens",)), (worker.StepSampler, ("gap",)))
    return sites


def instrument(on: bool, fine: bool = False) -> None:
    for cls, names in hook_sites(fine):
        for name in names:
            fn = cls.__dict__.get(name)
            if fn is None:
                continue
            if on and not hasattr(fn, "__wrapped__"):
                setattr(cls, name, timed(f"{cls.__name__}.{name}", fn))
            elif not on and hasattr(fn, "__wrapped__"):
                setattr(cls, name, fn.__wrapped__)


def _noop() -> None:
    pass


def probe(on: bool) -> None:
    """Around WorkerMonitor.step_end (after instrument): a no-op call timed just before the hook (cold: the first
    code of ours after vLLM's step) and just after it, and one more event record on a scratch event right after the
    hook's own (warm). Cold against warm tells vLLM's process's cache and predictor state from the calls' cost."""
    from moe_monitor.plugin import worker

    cls, clock, add = worker.WorkerMonitor, time.perf_counter_ns, SAMPLES
    hook = cls.__dict__["step_end"]
    if not on:
        if hasattr(hook, "_probed"):
            cls.step_end = hook._probed
        return
    scratch = {}

    def step_end(self):
        t = clock()
        _noop()
        add["probe: no-op before the hook (cold)"].append(clock() - t)
        hook(self)
        events = getattr(self.timer, "events", None)
        if events is not None:
            event = scratch.get(id(events)) or scratch.setdefault(id(events), events.new())
            t = clock()
            events.record(event)
            add["probe: one more event record (warm)"].append(clock() - t)
        t = clock()
        _noop()
        add["probe: no-op after the hook (warm)"].append(clock() - t)

    step_end._probed = hook
    cls.step_end = step_end


def wrapper_cost(n: int = 100_000) -> float:
    """ns the wrapper adds per call (a wrapped no-op, minus the no-op)."""
    def noop():
        return None
    wrapped = timed("noop", noop)
    t = time.perf_counter_ns()
    for _ in range(n):
        noop()
    bare = time.perf_counter_ns() - t
    t = time.perf_counter_ns()
    for _ in range(n):
        wrapped()
    SAMPLES.pop("noop", None)
    return (time.perf_counter_ns() - t - bare) / n


def publisher_cost(layers: int, experts: int, repeats: int = 200) -> dict:
    from publisher_cost_breakdown import make_publisher

    pub = make_publisher(layers, experts)
    times = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        assert pub.publish_once()
        times.append(time.perf_counter_ns() - t)
    return {"layers": layers, "experts": experts, "repeats": repeats, "median_us": statistics.median(times) / 1e3,
            "p90_us": sorted(times)[int(0.9 * repeats)] / 1e3, "min_us": min(times) / 1e3}


def hooks_floor(batches: list[int], everies: list[int], steps: int = 200_000) -> list[dict]:
    """The step hooks' Python alone (no vLLM, no CUDA): WorkerMonitor.step_begin + step_end on decode scheduler
    outputs of `batch` requests, with the CPU recorder and a timer whose calls do nothing, so what is measured is
    the hooks' own bookkeeping (phase scan, step count, sampler) in a tight loop: a floor, not the in-engine cost."""
    from types import SimpleNamespace

    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.steps import StepStats
    from moe_monitor.plugin.worker import WorkerMonitor

    class NullTimer:
        def __init__(self):
            self.steps = StepStats(max_queued=steps + 1)

        def begin(self, phase, tokens, chained=False):
            pass

        def end(self):
            pass

        def cancel(self):
            pass

    rows = []
    for every in everies:
        for batch in batches:
            ids = [f"r{i}" for i in range(batch)]
            output = SimpleNamespace(total_num_scheduled_tokens=batch, num_scheduled_tokens=dict.fromkeys(ids, 1),
                                     scheduled_new_reqs=[], scheduled_cached_reqs=SimpleNamespace(
                                         req_ids=ids, num_output_tokens=[5] * batch, resumed_req_ids=set()))
            monitor = WorkerMonitor(Recorder(1, 8, 2, "cpu"), None, NullTimer(), time_every=every, seed=0)
            monitor.vllm_tokens = object()  # as where vLLM's buffer is read: no write a step
            begin, end = monitor.step_begin, monitor.step_end
            t = time.perf_counter_ns()
            for _ in range(steps):
                begin(output)
                end()
            ns = (time.perf_counter_ns() - t) / steps
            rows.append({"kind": "hooks_floor", "every": every, "batch": batch, "ns_per_step": ns})
    return rows


# ------------------------------------------------------------------------------------------ the engine's worker

def _detach(worker, on: bool):
    """Attach (on) or detach the worker's monitor; the detached one is kept on the worker to come back."""
    if not hasattr(worker, "_moe_monitor_kept"):
        worker._moe_monitor_kept = worker._moe_monitor
    worker._moe_monitor = worker._moe_monitor_kept if on else None
    return worker._moe_monitor is not None


def _set_every(worker, every: int) -> int:
    """Time one step in `every` from now on (the plugin's StepSampler, as MOE_MONITOR_STEP_TIME_EVERY sets it)."""
    from moe_monitor.plugin.worker import StepSampler

    m = worker._moe_monitor_kept if hasattr(worker, "_moe_monitor_kept") else worker._moe_monitor
    m.sampler = StepSampler(every, seed=0)
    m._countdown = m.sampler.gap()
    return every


def _describe(worker):
    m = worker._moe_monitor_kept if hasattr(worker, "_moe_monitor_kept") else worker._moe_monitor
    return {"recorder": m.recorder.mode, "driver": getattr(m.recorder, "driver", None) is not None,
            "timer_events": type(getattr(m.timer, "events", None)).__name__,
            "zero_after_forward": getattr(m, "zero_after_forward", True),
            "reads_vllm_step_tokens": getattr(m, "vllm_tokens", None) is not None,
            "time_every": getattr(getattr(m, "sampler", None), "every", 1)}


STEP_LOG: list[list] = []  # every step the plugin counted: [phase, tokens, seconds or None (not timed)]


class _Stride:
    """A StepSampler stand-in that times every `every`-th step exactly (the trace pass: with 2, no timed step
    follows a timed one, so every one records its own start event)."""

    def __init__(self, every: int):
        self.every = every

    def gap(self) -> int:
        return self.every


def _log_steps(worker, stride: int):
    """stride > 0: time every stride-th step and log every step into STEP_LOG (a timed step's seconds filled in when
    the timer resolves it); 0: stop logging. This process only."""
    from moe_monitor.channel import PHASES

    m = worker._moe_monitor_kept if hasattr(worker, "_moe_monitor_kept") else worker._moe_monitor
    steps, timer = m.timer.steps, m.timer
    if stride:
        step, record, begin = type(steps).step, type(steps).record, type(timer).begin
        timed: list[int] = []  # STEP_LOG indices of the timed steps, in order

        def logged_step(phase, tokens):
            STEP_LOG.append([PHASES[phase], tokens, None])
            step(steps, phase, tokens)

        def logged_begin(phase, tokens, chained=False):
            timed.append(len(STEP_LOG) - 1)
            begin(timer, phase, tokens, chained)

        def logged_record(phase, tokens, seconds):
            while timed:  # a cancelled timed step is never recorded: skip to the one this is
                i = timed.pop(0)
                if STEP_LOG[i][:2] == [phase, tokens]:
                    STEP_LOG[i][2] = seconds
                    break
            record(steps, phase, tokens, seconds)
        steps.step, steps.record, timer.begin = logged_step, logged_record, logged_begin
        m.sampler, m._countdown = _Stride(stride), stride
    else:
        for obj, name in ((steps, "step"), (steps, "record"), (timer, "begin")):
            obj.__dict__.pop(name, None)
    return len(STEP_LOG)


def align(mine: list[list], trace: list[dict]) -> list[tuple[dict, list]]:
    """Pairs (trace step, plugin step: [phase, tokens, seconds or None]) at the offset where the most token counts
    agree."""
    best, best_offset = -1, 0
    for offset in range(-len(trace) + 1, len(mine)):
        agree = sum(1 for i, s in enumerate(trace)
                    if 0 <= i + offset < len(mine) and mine[i + offset][1] == s["tokens"])
        if agree > best:
            best, best_offset = agree, offset
    return [(s, mine[i + best_offset]) for i, s in enumerate(trace)
            if 0 <= i + best_offset < len(mine) and mine[i + best_offset][1] == s["tokens"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--eager", action="store_true", help="vLLM's --enforce-eager (default: its CUDA graphs)")
    ap.add_argument("--hooks", default="", help="batch sizes of the per-hook pass (e.g. 1,8,32,128)")
    ap.add_argument("--ab", default="", help="batch sizes of the on/off rounds (e.g. 1,8,32)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--probe", action="store_true", help="cold/warm probes around step_end (see probe())")
    ap.add_argument("--fine", action="store_true", help="also time the driver calls, the timer and the phase scan "
                    "inside the hooks (each nested call adds the wrapper's cost to its hook's figure)")
    ap.add_argument("--trace", default="", help="the step-time-against-the-profiler pass, once per stride of this "
                    "list (1: every step timed, chained; 2: every other step, each recording its own start)")
    ap.add_argument("--every", default="", help="time one step in N, for each N of this list in turn in the hooks "
                    "pass, the first in the on/off pass (e.g. 16,1; default: the plugin's own, "
                    "MOE_MONITOR_STEP_TIME_EVERY)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--label", default="", help="a name for this run in the output (e.g. the plugin's version)")
    ap.add_argument("--out", help="JSON lines, one per measurement")
    ap.add_argument("--publisher", metavar="LxE", help="only the publisher's publish_once at L layers x E experts")
    ap.add_argument("--floor", action="store_true", help="only the hooks' Python in a tight loop (no GPU, no vLLM): "
                    "batches of --hooks, samplers of --every")
    args = ap.parse_args()
    if args.floor:
        for row in hooks_floor([int(b) for b in (args.hooks or "1,8,32,128").split(",")],
                               [int(e) for e in (args.every or "16,1").split(",")]):
            print(json.dumps(row))
        return
    if args.publisher:
        layers, experts = map(int, args.publisher.lower().split("x"))
        print(json.dumps(publisher_cost(layers, experts)))
        return
    if not args.out:
        ap.error("--out is required (or --publisher LxE)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("MOE_MONITOR_SEGMENT_DIR", tempfile.mkdtemp(prefix="seg_"))
    from vllm import LLM, SamplingParams

    model = write_model(args.shape, tempfile.mkdtemp(prefix="model_"), args.layers)
    profiles = tempfile.mkdtemp(prefix="profiles_")
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              attention_config={"backend": "TRITON_ATTN"}, max_model_len=2048, max_num_seqs=128,
              max_num_batched_tokens=512, enable_prefix_caching=False, gpu_memory_utilization=0.85,
              enforce_eager=args.eager,
              profiler_config={"profiler": "torch", "torch_profiler_dir": profiles, "ignore_frontend": True,
                               "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True})
    vocab = SHAPES[args.shape]["config"]["vocab_size"]
    params = SamplingParams(max_tokens=args.out_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    rng = random.Random(0)
    base = {"label": args.label, "shape": args.shape, "layers": args.layers, "eager": args.eager,
            "plugin": llm.collective_rpc(_describe)[0]}
    print(f"{args.label}: {base}", flush=True)
    out = open(args.out, "a")

    def emit(row: dict) -> None:
        out.write(json.dumps(base | row) + "\n")
        out.flush()

    def run(prompts) -> float:
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    batches = sorted({int(b) for b in (args.hooks + "," + args.ab).split(",") if b})
    prompts = {b: prompts_of(vocab, b, args.prompt, rng) for b in batches}
    for b in batches:
        run(prompts[b])  # warm-up of this batch size (vLLM compiles what it has not seen)

    everies = [int(e) for e in args.every.split(",") if e] or [0]  # 0: leave the plugin's own
    if args.hooks:
        overhead_ns = wrapper_cost()
        instrument(True, args.fine)
        probe(args.probe)
        for every, batch in ((e, int(b)) for e in everies for b in args.hooks.split(",")):
            if every:
                llm.collective_rpc(_set_every, args=(every,))
            SAMPLES.clear()
            wall = run(prompts[batch])
            steps = len(SAMPLES.get("WorkerMonitor.step_begin", [])) or args.out_tokens
            hooks = {name: {"calls": len(v), "mean_us": statistics.fmean(v) / 1e3,
                            "median_us": statistics.median(v) / 1e3,
                            "p90_us": sorted(v)[int(0.9 * len(v))] / 1e3, "p99_us": sorted(v)[int(0.99 * len(v))] / 1e3,
                            "max_us": max(v) / 1e3} for name, v in sorted(SAMPLES.items())}
            per_step = sum(sum(SAMPLES.get(h, [])) for h in PER_STEP) / 1e3 / steps
            row = {"kind": "hooks", "batch": batch, "every": every or None, "steps": steps,
                   "step_wall_ms": 1e3 * wall / steps, "hooks_us_per_step": per_step,
                   "wrapper_ns_per_call": overhead_ns, "hooks": hooks}
            emit(row)
            print(f"{args.label} hooks every {every or '-'} batch {batch:3d}: {1e3 * wall / steps:.3f} ms a step, "
                  f"plugin hooks {per_step:.2f} us a step ({per_step / 10 / (1e3 * wall / steps):.3f} %)", flush=True)
            for name, h in hooks.items():
                print(f"    {name:32s} {h['calls']:6d} calls  mean {h['mean_us']:8.2f} us  median "
                      f"{h['median_us']:8.2f}  p90 {h['p90_us']:8.2f}  p99 {h['p99_us']:8.2f}  max "
                      f"{h['max_us']:8.2f} us", flush=True)
        probe(False)
        instrument(False, args.fine)
        print(f"the timing wrapper adds {overhead_ns:.0f} ns a call (not subtracted)", flush=True)

    if args.ab:
        for every, batch in ((everies[0], int(b)) for b in args.ab.split(",")):
            if every:
                llm.collective_rpc(_set_every, args=(every,))
            per = {"on": [], "off": [], "off2": []}
            order = ["on", "off", "off2"]
            for r in range(args.rounds):
                for mode in order[r % 3:] + order[:r % 3]:
                    llm.collective_rpc(_detach, args=(mode == "on",))
                    per[mode].append(1e3 * run(prompts[batch]) / args.out_tokens)
            llm.collective_rpc(_detach, args=(True,))
            stats = {m: {"min_ms": min(v), "median_ms": statistics.median(v), "rounds_ms": v} for m, v in per.items()}
            row = {"kind": "ab", "batch": batch, "every": every or None, "rounds": args.rounds, "modes": stats}
            for name, (a, b) in (("on_vs_off", ("on", "off")), ("aa", ("off2", "off"))):
                for key in ("min", "median"):
                    row[f"{name}_{key}_pct"] = 100 * (stats[a][f"{key}_ms"] / stats[b][f"{key}_ms"] - 1)
                # paired: the two runs of one round, side by side in time (drift between rounds cancels)
                row[f"{name}_paired_median_pct"] = 100 * statistics.median(x / y - 1 for x, y in zip(per[a], per[b]))
            emit(row)
            print(f"{args.label} A/B every {every or '-'} batch {batch:3d}: on {stats['on']['min_ms']:.4f} / "
                  f"{stats['on']['median_ms']:.4f} ms, off {stats['off']['min_ms']:.4f} / "
                  f"{stats['off']['median_ms']:.4f}, off2 {stats['off2']['min_ms']:.4f} / "
                  f"{stats['off2']['median_ms']:.4f} (min / median); on-off {row['on_vs_off_min_pct']:+.2f} % / "
                  f"{row['on_vs_off_median_pct']:+.2f} % / paired {row['on_vs_off_paired_median_pct']:+.2f} %, A/A "
                  f"{row['aa_min_pct']:+.2f} % / {row['aa_median_pct']:+.2f} % / paired "
                  f"{row['aa_paired_median_pct']:+.2f} %", flush=True)

    for stride in (int(x) for x in args.trace.split(",") if x):
        from trace_steps import trace_step_times

        lengths = [rng.randrange(40, 400) for _ in range(16)]
        work = [prompts_of(vocab, 1, n, rng)[0] for n in lengths]
        trace_params = SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.0, detokenize=False)
        llm.generate(work, trace_params, use_tqdm=False)  # warm-up: the same step shapes, compiled
        before = set(glob.glob(os.path.join(profiles, "**", "*.pt.trace.json*"), recursive=True))
        llm.collective_rpc(_log_steps, args=(stride,))
        STEP_LOG.clear()
        llm.start_profile()
        llm.generate(work, trace_params, use_tqdm=False)
        llm.stop_profile()
        llm.generate(prompts_of(vocab, 1, 8, rng), SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
        llm.collective_rpc(_log_steps, args=(0,))
        files = [f for f in set(glob.glob(os.path.join(profiles, "**", "*.pt.trace.json*"), recursive=True)) - before
                 if "async_llm" not in os.path.basename(f)]
        theirs = trace_step_times(sorted(files)[0])
        pairs = [(t, p) for t, p in align(list(STEP_LOG), theirs) if p[2] is not None]
        rows = {}
        for phase in ("prefill", "mixed", "decode"):
            mine = [(t["step_s"], p[2], t["forward_s"], t["idle_before_s"]) for t, p in pairs if t["phase"] == phase]
            if not mine:
                continue
            trace_mean = statistics.fmean(x[0] for x in mine)
            plugin_mean = statistics.fmean(x[1] for x in mine)
            diffs = sorted(1e6 * (x[1] - x[0]) for x in mine)
            rows[phase] = {"steps": len(mine), "trace_ms": 1e3 * trace_mean, "plugin_ms": 1e3 * plugin_mean,
                           "diff_pct": 100 * (plugin_mean / trace_mean - 1),
                           "forward_ms": 1e3 * statistics.fmean(x[2] for x in mine),
                           "idle_before_ms": 1e3 * statistics.fmean(x[3] for x in mine),
                           "within_bounds": sum(1 for x in mine if x[0] - 2e-6 <= x[1] <= x[0] + x[3] + 2e-6),
                           "diff_us_median": statistics.median(diffs), "diff_us_min": diffs[0],
                           "diff_us_max": diffs[-1]}
            r = rows[phase]
            print(f"{args.label} trace (every {stride}) {phase:8s} {len(mine):3d} steps: plugin {r['plugin_ms']:.3f} "
                  f"ms, trace {r['trace_ms']:.3f} ms ({r['diff_pct']:+.2f} %; per step plugin-trace median "
                  f"{r['diff_us_median']:+.1f} us, {diffs[0]:+.1f} to {diffs[-1]:+.1f}); vLLM's forward "
                  f"annotation {r['forward_ms']:.3f} ms; device idle before the step {r['idle_before_ms']:.3f} ms; "
                  f"{r['within_bounds']}/{len(mine)} steps within [trace, trace + idle before]", flush=True)
        emit({"kind": "trace", "stride": stride, "trace_steps": len(theirs), "plugin_steps": len(STEP_LOG),
              "matched_timed": len(pairs), "phases": rows, "trace_file": os.path.basename(sorted(files)[0])})
    out.close()
    os._exit(0)


if __name__ == "__main__":
    main()
