"""Expert parallelism on two GPUs with real vLLM (issue #16): segments, the sidecar's EP-rank load, vLLM's own EPLB
load and both ranks' profiler traces, for TP=2+EP, DP=2+EP and DP=2+EP with EPLB, in one device call.

    . .gpu/device-env.sh; python3 benchmarks/vllm_ep.py --out $OUT      # device kind nvidia-h200-x2

Per configuration: a tiny Qwen3-MoE (16 experts, top-2, 4 layers, expert 3 hot for the hot words) is generated,
vLLM's OpenAI server starts with the plugin (CUDA graphs, vLLM's defaults), a sidecar reads the segments (1 s
windows); balanced then hot traffic; a profile of a few steps of both ranks (`/start_profile`); then the sidecar's
/metrics, the segments, vLLM's log, the traces and (with EPLB) vLLM's own per-rank physical expert load
(benchmarks/eplb_reference) go into `$OUT/<config>.tar.gz`, and a summary line into `$OUT/summary.jsonl`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_monitor.demo import launch, workload  # noqa: E402

# Every step recorded (window_size >= step_interval), balancedness logged every step. `dp2ep_eplb`: a
# rearrangement every 16 steps (churn: several per 1 s sidecar window); `dp2ep_eplb_rare`: every 60 steps
# (two or three per run), closer to vLLM's default of 3000.
EPLB = {"num_redundant_experts": 2, "window_size": 16, "step_interval": 16, "log_balancedness": True,
        "log_balancedness_interval": 1}
EPLB_RARE = dict(EPLB, window_size=60, step_interval=60)
CONFIGS = {
    "tp2ep": ["--tensor-parallel-size", "2", "--enable-expert-parallel"],
    "dp2ep": ["--data-parallel-size", "2", "--enable-expert-parallel"],
    "dp2ep_eplb": ["--data-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb",
                   "--eplb-config", json.dumps(EPLB)],
    "dp2ep_eplb_rare": ["--data-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb",
                        "--eplb-config", json.dumps(EPLB_RARE)],
}
REFERENCE_PLUGIN = os.path.join(ROOT, "benchmarks", "eplb_reference")


def post(url: str, body: dict | None = None, timeout: float = 120) -> int:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status


def run_config(name: str, args: list[str], model: str, meta: dict, out: str) -> dict:
    work = os.path.join("/tmp/vllm_ep", name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    segments, profiles, reference = (os.path.join(work, d) for d in ("segments", "profiles", "eplb_reference"))
    env = launch.vllm_env(segments, publish_interval=0.2)
    env["MOE_EPLB_REFERENCE_DIR"] = reference
    env["PYTHONPATH"] = os.pathsep.join([REFERENCE_PLUGIN, env.get("PYTHONPATH", "")])
    profiler = {"profiler": "torch", "torch_profiler_dir": profiles, "torch_profiler_with_stack": False,
                "torch_profiler_use_gzip": True, "max_iterations": 6}
    began = time.time()
    server = launch.start_vllm(model, launch.free_port(), os.path.join(work, "vllm.log"), env,
                               ["--attention-backend", "TRITON_ATTN", "--profiler-config", json.dumps(profiler),
                                "--max-num-seqs", "64", *args], gpu=True)
    sidecar = launch.start_sidecar(segments, launch.free_port(), os.path.join(work, "sidecar.log"),
                                   ["--window", "1", "--expert-series", "all",
                                    "--captures-api-insecure"])  # loopback on the device: /api/flight below
    result = {"config": name, "args": args}
    try:
        result["ready_s"] = round(server.wait_ready("/health", 400), 1)
        sidecar.wait_ready("/healthz", 60)
        done = workload.run(server.url, workload.prompts(32, seed=1), max_tokens=24, concurrency=16)
        done += workload.run(server.url, workload.prompts(32, meta["hot_words"], hot_share=0.8, seed=2),
                             max_tokens=24, concurrency=16)
        result["computed_tokens"] = sum(len(c.computed_token_ids) for c in done)
        time.sleep(2.5)  # two more sidecar windows: every count is in a closed window
        with open(os.path.join(work, "metrics_before_profile.txt"), "wb") as f:
            f.write(urllib.request.urlopen(sidecar.url + "/metrics", timeout=30).read())
        post(server.url + "/start_profile")
        workload.run(server.url, workload.prompts(8, meta["hot_words"], hot_share=0.5, seed=3), max_tokens=8,
                     concurrency=8)
        try:
            post(server.url + "/stop_profile", timeout=300)
        except Exception as e:  # noqa: BLE001 - max_iterations may have stopped it already
            result["stop_profile"] = str(e)[:200]
        deadline = time.time() + 90
        while time.time() < deadline and len(glob.glob(os.path.join(profiles, "*.json.gz"))) < 2:
            time.sleep(1)
        result["traces"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(profiles, "*.json.gz")))
        time.sleep(2.5)
        with open(os.path.join(work, "metrics.txt"), "wb") as f:
            f.write(urllib.request.urlopen(sidecar.url + "/metrics", timeout=30).read())
        with open(os.path.join(work, "flight.json"), "wb") as f:
            f.write(urllib.request.urlopen(sidecar.url + "/api/flight", timeout=30).read())
    except Exception as e:  # noqa: BLE001 - keep what we have
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        sidecar.stop()
        server.stop()
    result["seconds"] = round(time.time() - began, 1)
    log = open(os.path.join(work, "vllm.log"), errors="replace").read()
    result["log_errors"] = sorted({line.strip()[:200] for line in log.splitlines()
                                   if "ERROR" in line or "Traceback" in line})[:20]
    with tarfile.open(os.path.join(out, f"{name}.tar.gz"), "w:gz") as tar:
        tar.add(work, arcname=name)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="dp2ep_eplb,tp2ep,dp2ep")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from moe_monitor.demo.tiny_model import generate

    model = "/tmp/vllm_ep_model"
    meta = generate(model, "qwen3_moe", num_layers=4, num_experts=16, top_k=2, hot_expert=3,
                    hot_words=["hot", "blaze"], seed=0)
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in a.configs.split(","):
        result = run_config(name, CONFIGS[name], model, meta, a.out)
        result["rev"] = rev
        print(json.dumps(result), flush=True)
        with open(os.path.join(a.out, "summary.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
