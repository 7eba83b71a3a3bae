"""vLLM server startup time with and without the moe-monitor plugin (same command, VLLM_PLUGINS="" as the
baseline), runs interleaved A/B, medians printed. CPU build; the model is the generated tiny Qwen3-MoE.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--compiled]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from moe_monitor.demo import launch
from moe_monitor.demo.tiny_model import generate


def one(model_dir: str, work: str, plugin: bool, compiled: bool, i: int) -> float:
    env = launch.vllm_env(f"{work}/seg{i}", plugin=plugin)
    if compiled:
        env["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    args = [] if compiled else ["--enforce-eager"]
    proc = launch.start_vllm(model_dir, 8090, f"{work}/vllm{i}.log", env, args)
    try:
        return proc.wait_ready("/health", 600)
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile instead of eager")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir = f"{work}/model"
        generate(model_dir, "qwen3_moe")
        times = {True: [], False: []}
        for i in range(args.runs):
            for plugin in (False, True):
                t = one(model_dir, work, plugin, args.compiled, len(times[True]) + len(times[False]))
                times[plugin].append(t)
                print(f"run {i} plugin={'on ' if plugin else 'off'} ready after {t:.1f} s", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    mode = "compiled" if args.compiled else "eager"
    print(f"vLLM CPU startup ({mode}, tiny Qwen3-MoE, {args.runs} interleaved runs each): "
          f"without plugin median {off:.1f} s, with plugin median {on:.1f} s, difference {on - off:+.1f} s")


if __name__ == "__main__":
    main()
