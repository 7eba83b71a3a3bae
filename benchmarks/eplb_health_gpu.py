"""EPLB health on real vLLM with two GPUs (issue #29): rearrangements counted, durations against vLLM's own log, and
a hung rearrangement seen, in one device call per one or two configurations (each starts vLLM: ~1.5 min).

    . .gpu/device-env.sh; python3 benchmarks/eplb_health_gpu.py --out $OUT --configs sync,async_hang
    # device kind nvidia-h200-x2 (or nvidia-h100-x2); carry .gpu

Every configuration: a tiny Qwen3-MoE (16 experts, top-2, 4 layers, expert 3 hot for the hot words), vLLM's OpenAI
server with DP=2 + EP and `--enable-eplb` (2 redundant experts, a rearrangement every STEP_INTERVAL steps), the
moe-monitor plugin, and the test-only plugin benchmarks/eplb_hang (a hung rearrangement on demand); a sidecar reads
the segments (1 s windows). Hot traffic runs for RUN_S seconds while the sidecar's /metrics is polled every second.

- `sync`, `async`: no hang. Checked: every rank's moe_eplb_rearrangements_total moves; EP rank 0's count equals
  vLLM's "Rearranged experts ... in X s" lines (sync) or its "Rearranging experts (async mode)" lines that were
  followed by the last layer's commit (async: rearrangements started - 1 at most in flight); the sync durations
  (moe_eplb_last_rearrangement_duration_seconds, sampled after each change) against vLLM's logged X, matched in
  order; moe_eplb_rearrangement_overdue_steps stays 0 (sync) or below one interval (async); no stall.
- `sync_hang`: the 2nd rearrangement's weight transfer sleeps HANG_S seconds (the engine waits inside it).
  Checked: moe_eplb_rearrangement_in_progress_seconds climbs to about HANG_S on both ranks while no step runs, then
  the rearrangement completes with a duration of about HANG_S and vLLM logs about the same.
- `async_hang`: from the 2nd rearrangement on, the async worker's transfer blocks for good. Checked: serving goes on,
  moe_eplb_rearrangements_total stops, moe_eplb_steps_since_rearrangement passes 2 x the interval and
  moe_eplb_rearrangement_overdue_steps keeps growing on both ranks, and the stall rule (docs/eplb.md) evaluated on
  the polled series holds; vLLM logs nothing about it (its log is searched for warnings after the hang).

Per configuration `$OUT/<config>.tar.gz` (vLLM's and the sidecar's logs, the polled metrics as JSON lines, the final
segments) and a line of `$OUT/summary.jsonl` with the checks and their figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_monitor.demo import launch, workload  # noqa: E402

STEP_INTERVAL = 40
HANG_S = 45.0
RUN_S = 150.0
EPLB = {"num_redundant_experts": 2, "window_size": STEP_INTERVAL, "step_interval": STEP_INTERVAL}
CONFIGS = {  # name: (use_async, hang mode or None)
    "sync": (False, None), "async": (True, None), "sync_hang": (False, "sync"), "async_hang": (True, "async"),
}
HANG_PLUGIN = os.path.join(ROOT, "benchmarks", "eplb_hang")
LOGGED = re.compile(r"Rearranged experts .*?in ([\d.]+) s")
STARTED_ASYNC = re.compile(r"Rearranging experts \(async mode\)")
EPLB_SERIES = ("moe_eplb_rearrangements_total", "moe_eplb_rearrangements_started_total",
               "moe_eplb_last_rearrangement_duration_seconds", "moe_eplb_steps_since_rearrangement",
               "moe_eplb_rearrangement_overdue_steps", "moe_eplb_rearrangement_in_progress_seconds",
               "moe_eplb_rearrangement_interval_steps", "moe_eplb_info")


def scrape(url: str) -> dict[str, dict[str, float]]:
    """{metric: {segment: value}} of the EPLB families (moe_eplb_info: {segment: mode})."""
    out: dict[str, dict] = {name: {} for name in EPLB_SERIES}
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        m = re.match(r'(moe_eplb_[a-z_]+)\{([^}]*)\} (\S+)$', line)
        if not m or m.group(1) not in out:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        out[m.group(1)][labels["segment"]] = labels.get("mode") if m.group(1) == "moe_eplb_info" else float(
            m.group(3))
    return out


def stall_rule(polls: list[dict], window_s: int = 5, intervals: float = 2.0) -> dict[str, bool]:
    """MoeEplbRearrangementStalled's overdue arm per segment, on the polled series (one poll a second): steps flowed
    in the last window_s polls and overdue >= (intervals - 1) x interval at the last poll."""
    last, before = polls[-1], polls[-1 - window_s] if len(polls) > window_s else polls[0]
    out = {}
    for seg, overdue in last["moe_eplb_rearrangement_overdue_steps"].items():
        interval = last["moe_eplb_rearrangement_interval_steps"].get(seg, 0)
        flowing = last["moe_eplb_steps_since_rearrangement"].get(seg, 0) > before[
            "moe_eplb_steps_since_rearrangement"].get(seg, 0)
        out[seg] = bool(flowing and overdue > 0 and overdue >= (intervals - 1) * interval)
    return out


def run_config(name: str, model: str, meta: dict, out: str) -> dict:
    use_async, hang = CONFIGS[name]
    work = os.path.join("/tmp/eplb_health", name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    segments = os.path.join(work, "segments")
    env = launch.vllm_env(segments, publish_interval=0.2)
    env["PYTHONPATH"] = os.pathsep.join([HANG_PLUGIN, env.get("PYTHONPATH", "")])
    if hang:
        env.update(MOE_EPLB_HANG=hang, MOE_EPLB_HANG_AFTER="2", MOE_EPLB_HANG_SECONDS=str(HANG_S))
    eplb = dict(EPLB, use_async=use_async)
    began = time.time()
    server = launch.start_vllm(model, launch.free_port(), os.path.join(work, "vllm.log"), env,
                               ["--attention-backend", "TRITON_ATTN", "--max-num-seqs", "64",
                                "--data-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb",
                                "--eplb-config", json.dumps(eplb)], gpu=True)
    sidecar = launch.start_sidecar(segments, launch.free_port(), os.path.join(work, "sidecar.log"), ["--window", "1"])
    result: dict = {"config": name, "eplb": eplb, "hang": hang}
    polls: list[dict] = []
    stop = threading.Event()

    def traffic() -> None:
        seed = 10
        while not stop.is_set():
            try:
                workload.run(server.url, workload.prompts(16, meta["hot_words"], hot_share=0.8, seed=seed),
                             max_tokens=32, concurrency=16)
            except Exception:  # noqa: BLE001 - a request that times out during a hang: go on
                time.sleep(1)
            seed += 1

    try:
        result["ready_s"] = round(server.wait_ready("/health", 400), 1)
        sidecar.wait_ready("/healthz", 60)
        client = threading.Thread(target=traffic, daemon=True)
        client.start()
        end = time.time() + RUN_S
        with open(os.path.join(work, "polls.jsonl"), "w") as f:
            while time.time() < end:
                try:
                    p = scrape(sidecar.url)
                    p["t"] = round(time.time() - began, 2)
                    polls.append(p)
                    f.write(json.dumps(p) + "\n")
                except Exception as e:  # noqa: BLE001 - the sidecar answers again next second
                    result.setdefault("scrape_errors", []).append(str(e)[:120])
                time.sleep(1)
        stop.set()
    except Exception as e:  # noqa: BLE001 - keep what we have
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        stop.set()
        sidecar.stop()
        server.stop()
    log = open(os.path.join(work, "vllm.log"), errors="replace").read()
    result.update(check(name, polls, log))
    result["seconds"] = round(time.time() - began, 1)
    result["log_errors"] = sorted({line.strip()[:200] for line in log.splitlines()
                                   if "ERROR" in line or "Traceback" in line})[:20]
    with tarfile.open(os.path.join(out, f"{name}.tar.gz"), "w:gz") as tar:
        tar.add(work, arcname=name)
    return result


def check(name: str, polls: list[dict], log: str) -> dict:
    """The figures and pass/fail of one configuration (see the module docstring)."""
    if not polls:
        return {"ok": False, "why": "no poll of the sidecar"}
    use_async, hang = CONFIGS[name]
    last = polls[-1]
    counts = last["moe_eplb_rearrangements_total"]
    logged = [float(x) for x in LOGGED.findall(log)]
    r: dict = {"rearrangements": counts, "started": last["moe_eplb_rearrangements_started_total"],
               "logged_durations": logged, "async_starts_logged": len(STARTED_ASYNC.findall(log)),
               "modes": last["moe_eplb_info"]}
    # the durations the sidecar showed, one per change of the count (EP rank 0's segment: dp0)
    seg0 = sorted(counts)[0] if counts else None
    seen, prev = [], 0.0
    for p in polls:
        n = p["moe_eplb_rearrangements_total"].get(seg0, 0.0)
        if n > prev:
            seen.append((n, p["moe_eplb_last_rearrangement_duration_seconds"].get(seg0)))
            prev = n
    r["durations_seen"] = seen
    r["max_in_progress_s"] = max((max(p["moe_eplb_rearrangement_in_progress_seconds"].values(), default=0.0)
                                  for p in polls), default=0.0)
    r["max_overdue_steps"] = max((max(p["moe_eplb_rearrangement_overdue_steps"].values(), default=0.0)
                                  for p in polls), default=0.0)
    r["stall_rule_at_end"] = stall_rule(polls)
    checks = {"counted": bool(counts) and all(v >= 1 for v in counts.values()),
              "both_ranks": len(counts) == 2}
    if not use_async:
        checks["count_matches_vllm_log"] = seg0 is not None and counts[seg0] == len(logged) - 1  # - the profile run
        pairs = [(d, logged[int(n)]) for n, d in seen if d is not None and int(n) < len(logged)]
        r["duration_pairs"] = pairs  # (ours, vLLM's) for the same rearrangement (vLLM's first line: the profile run)
        checks["durations_within_10pct_or_50ms"] = bool(pairs) and all(
            abs(a - b) <= max(0.05, 0.1 * b) for a, b in pairs)
    if hang is None:
        checks["no_stall"] = not any(r["stall_rule_at_end"].values())
        checks["overdue_below_an_interval"] = r["max_overdue_steps"] < STEP_INTERVAL
    elif hang == "sync":
        checks["in_progress_reached_hang"] = r["max_in_progress_s"] >= 0.8 * HANG_S
        checks["hung_duration_seen"] = any(d is not None and d >= 0.9 * HANG_S for _, d in seen)
    else:
        checks["stalled_at_end"] = bool(r["stall_rule_at_end"]) and all(r["stall_rule_at_end"].values())
        checks["overdue_grew"] = r["max_overdue_steps"] >= STEP_INTERVAL
        checks["count_stopped"] = all(v <= 1 for v in counts.values())
        tail = log[log.find("blocks its transfer"):] if "blocks its transfer" in log else ""
        r["vllm_warnings_after_hang"] = [x[:200] for x in tail.splitlines() if "WARNING" in x][:10]
    r["checks"] = checks
    r["ok"] = all(checks.values())
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="sync,async_hang")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from moe_monitor.demo.tiny_model import generate

    model = "/tmp/eplb_health_model"
    meta = generate(model, "qwen3_moe", num_layers=4, num_experts=16, top_k=2, hot_expert=3,
                    hot_words=["hot", "blaze"], seed=0)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in a.configs.split(","):
        result = run_config(name, model, meta, a.out)
        result["rev"] = rev
        print(json.dumps(result), flush=True)
        with open(os.path.join(a.out, "summary.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
