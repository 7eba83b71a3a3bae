#!/usr/bin/env bash
# One device call (about 5 minutes) after plugin_host_cost_gpu.sh (issue #27): the eager server's exact counts and
# its step time against the profiler (every step timed there), then the inlined step_begin against the one before
# it in one engine (24 layers, CUDA graphs, 1 in 16 timed; before/lean/before/lean/..., so each version has an A/A
# of its own), then, in what time is left, the hooks' host time in an eager engine (taps and the counting kernel's
# launch every step). From the checkout's root on the device, the slim vLLM bundle carried (../shared/gpu/README.md):
#     END=330 bash benchmarks/plugin_host_cost_lean_gpu.sh      # results under $OUT; END: seconds it may take
set -x
END=${END:-500}
. .gpu/device-env.sh > /dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc
export MOE_MONITOR_GPU_RESULTS=$OUT/gpu.jsonl MOE_MONITOR_GPU_ARTIFACTS=$OUT/art; mkdir -p "$OUT/art"
timeout 150 python3 -m pytest -q -m gpu tests/test_vllm_gpu.py -k "eager and not startup" -p no:cacheprovider \
    2>&1 | grep -E "passed|failed|Error|assert" | tail -15; echo "t=$SECONDS"
timeout $((END - 20 - SECONDS)) python3 benchmarks/plugin_host_cost.py --layers 24 --hooks 1,8,32 --every 16 \
    --variants before,lean,before,lean,before,lean --label lean --out "$OUT/lean.jsonl" > "$OUT/lean.txt" 2>&1
grep -E "^lean|WorkerMonitor|Error|error" "$OUT/lean.txt" | tail -80; echo "t=$SECONDS"
timeout $((END - 10 - SECONDS)) python3 benchmarks/plugin_host_cost.py --eager --layers 24 --hooks 1,8,32 \
    --every 16 --label eager --out "$OUT/eager.jsonl" > "$OUT/eager.txt" 2>&1
grep -E "^eager|WorkerMonitor|Tap|Recorder|Error|error" "$OUT/eager.txt" | tail -40; echo "t=$SECONDS"
