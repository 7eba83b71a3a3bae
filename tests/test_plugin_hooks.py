"""The plugin's per-step hooks: the phase of a step read from vLLM's scheduler output, and forwards that are not
steps (vLLM's dummy runs) counting nothing, proved in a real vLLM CPU engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from moe_monitor.plugin.worker import prefill_tokens


def step(new: dict[str, int], cached: dict[str, tuple[int, int]], resumed=()):
    """A scheduler output: new requests {id: tokens}, cached requests {id: (tokens, output tokens so far)}."""
    scheduled = dict(new) | {r: n for r, (n, _) in cached.items()}
    return SimpleNamespace(
        num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=list(cached), num_output_tokens=[o for _, o in cached.values()],
                                              resumed_req_ids=set(resumed)))


@pytest.mark.parametrize("new, cached, resumed, prefill", [
    ({}, {f"r{i}": (1, 5) for i in range(128)}, (), 0),  # pure decode: the fast path
    ({"a": 300}, {"b": (1, 3), "c": (1, 9)}, (), 300),  # a new prompt beside two decodes
    ({}, {"b": (1, 3), "c": (200, 0)}, (), 200),  # a prompt still being chunked (no output yet)
    ({}, {"b": (1, 3), "c": (1, 0)}, (), 1),  # its last chunk is one token: still prompt
    ({}, {"b": (1, 3), "c": (40, 7)}, {"c"}, 40),  # resumed after preemption: recomputes its tokens
    ({}, {"b": (4, 3)}, (), 0),  # speculative decoding: four tokens of one decoding request
])
def test_prefill_tokens_of_a_step(new, cached, resumed, prefill):
    assert prefill_tokens(step(new, cached, resumed)) == prefill


PROBE = textwrap.dedent("""
    import json, os, sys
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0, dtype="float32",
              enable_prefix_caching=False, gpu_memory_utilization=0.5)
    llm.generate(["the hot blaze of the sun", "a quiet evening"], SamplingParams(max_tokens=4, temperature=0.0),
                 use_tqdm=False)

    def dummy_runs(worker):
        monitor = worker._moe_monitor
        rec = monitor.recorder
        before = int(rec.host_counts().sum())
        routed = []
        record = rec.record
        rec.record = lambda row, ids: (routed.append(int(ids.shape[0])), record(row, ids))
        worker.execute_dummy_batch()          # what an idle DP rank runs
        worker.model_runner._dummy_run(16)    # any other dummy forward
        rec.record = record
        return {"before": before, "after": int(rec.host_counts().sum()), "routed_rows": sum(routed),
                "zero_after_forward": monitor.zero_after_forward}

    print("RESULT " + json.dumps(llm.collective_rpc(dummy_runs)[0]), flush=True)
    os._exit(0)
""")


def test_dummy_runs_after_serving_count_nothing(tiny_model, tmp_path):
    """vLLM's dummy runs (an idle DP rank's `execute_dummy_batch`, warm-ups) are forwards through the tapped routers
    with no step around them: the count of valid tokens is zeroed before each, so the step before them is not
    counted again, and no write follows every step's forward."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", MOE_MONITOR_SEGMENT_DIR=str(tmp_path),
               VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, tiny_model[0]], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["before"] > 0, result  # the generate was counted
    assert result["routed_rows"] > 0, result  # the dummy forwards did go through the taps...
    assert result["after"] == result["before"], result  # ...and counted nothing
    assert result["zero_after_forward"] is False, result  # zeroed before dummy runs, not after every step
