#!/usr/bin/env bash
# One device call (about 8 minutes) that proves and measures the sampled step timer on real GPU vLLM (issue #27):
# exact counts and the sampled step time against the profiler on a vLLM server, then the hooks' host time per step at
# 1 in 16 and every step in one engine, on against off, and the step time of chained and unchained timed steps
# against the profiler (benchmarks/results/plugin_host_cost_sampled.md). Run from the checkout's root on the device,
# with the slim vLLM bundle carried (../shared/gpu/README.md):
#     bash benchmarks/plugin_host_cost_gpu.sh          # results under $OUT
set -x
. .gpu/device-env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
export MOE_MONITOR_GPU_RESULTS=$OUT/gpu.jsonl MOE_MONITOR_GPU_ARTIFACTS=$OUT/art; mkdir -p "$OUT/art"
timeout 200 python3 -m pytest -q -m gpu tests/test_vllm_gpu.py -k "full_and_piecewise" -p no:cacheprovider 2>&1 | tail -25
echo "t=$SECONDS"
B="--layers 24 --hooks 1,8,32,128 --every 16,1 --rounds 7"
timeout $((470 - SECONDS)) python3 benchmarks/plugin_host_cost.py $B --ab 1,8,32 --trace 1,2 --label sampled \
    --out "$OUT/q24.jsonl" > "$OUT/q24.txt" 2>&1
grep -E "^sampled|WorkerMonitor|StepStats|Error|error" "$OUT/q24.txt" | tail -70; echo "t=$SECONDS"
H="--layers 2 --hooks 1,8 --every 16,1 --rounds 25 --out-tokens 64"
timeout $((590 - SECONDS)) python3 benchmarks/plugin_host_cost.py $H --ab 1,8 --label sampled-hostbound \
    --out "$OUT/hb.jsonl" > "$OUT/hb.txt" 2>&1
grep -E "^sampled|WorkerMonitor|Error|error" "$OUT/hb.txt" | tail -40; echo "t=$SECONDS"
