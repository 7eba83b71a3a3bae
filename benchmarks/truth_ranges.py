"""Test-only: `record_function` ranges naming the module or MoE step of every kernel an eager vLLM run launches.

Installed in the process that runs the model (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `enforce_eager=True`: compiled
code and CUDA-graph replays run no Python hooks), after the engine is built:

    from truth_ranges import install
    print(install(llm))    # what was wrapped

Modules get a forward pre-hook / hook pair opening `moe_truth::<role>:<module path>` (roles: see
`trace_truth.ROLE_CATEGORY`); a few functions inside vLLM's MoE layer and moe-monitor's recorder are wrapped
(`moe_truth::<role>:<qualname>`). `benchmarks/trace_truth.py` turns the profiled trace into per-kernel labels.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re

from trace_truth import range_name

# (module, attribute path, role): functions inside the MoE layer and the plugin; missing ones are reported
FUNCTIONS = (
    ("vllm.model_executor.layers.fused_moe.router.fused_moe_router", "FusedMoERouter.select_experts", "routing"),
    ("vllm.model_executor.layers.fused_moe.fused_moe", "_prepare_expert_assignment", "align"),
    ("vllm.model_executor.layers.fused_moe.experts.triton_moe", "_prepare_expert_assignment", "align"),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEKernelModularImpl._prepare", "align"),
    ("vllm.model_executor.layers.fused_moe.experts.triton_moe", "TritonExperts.moe_sum", "combine"),
    ("vllm.model_executor.layers.fused_moe.modular_kernel", "FusedMoEKernelModularImpl._finalize", "combine"),
    ("moe_monitor.plugin.recorder", "Recorder.record", "monitoring"),
    ("moe_monitor.plugin.recorder", "Recorder.flush", "monitoring"),
    ("moe_monitor.plugin.recorder", "Recorder.set_valid_tokens", "monitoring"),
)
MOE_CLASSES = ("MoERunnerInterface", "MoERunner", "FusedMoE", "SharedFusedMoE")
LAYER = re.compile(r"(.*\.)?layers\.\d+")


def module_role(paths: list[str], module, has_moe_child: bool) -> str | None:
    """The role of one module, from every path it is registered under (a router's gate is also the MoE layer's
    `gate`) and its class."""
    mro = {c.__name__ for c in type(module).__mro__}
    lasts = {p.rsplit(".", 1)[-1] for p in paths}
    linear = "LinearBase" in mro
    if mro & set(MOE_CLASSES):
        return "moe"
    if lasts & {"shared_expert_gate"}:
        return "shared_expert_gate"
    if lasts & {"shared_expert", "shared_experts"}:
        return "shared_experts"
    if linear and lasts & {"gate", "router"}:
        return "router_linear"
    if has_moe_child:
        return "moe_block"
    if mro & {"Attention", "AttentionLayerBase"}:
        return "attention"
    if lasts & {"rotary_emb"} or "RotaryEmbedding" in mro:
        return "rotary"
    if any("norm" in x for x in lasts) or any(c.endswith("Norm") for c in mro):
        return "norm"
    if lasts & {"embed_tokens", "embedding", "tok_embeddings", "wte"} or "VocabParallelEmbedding" in mro:
        return "embed"
    if linear:
        return "linear"
    if "LogitsProcessor" in mro:
        return "logits"
    if any(LAYER.fullmatch(p) for p in paths):
        return "layer"
    if "" in paths:
        return "model"
    return None


def _wrap(fn, name: str):
    import torch

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with torch.profiler.record_function(name):
            return fn(*args, **kwargs)

    inner._moe_truth = True
    return inner


def _hook_module(module, name: str) -> None:
    import torch

    open_ranges: list = []

    def pre(_mod, _args):
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        open_ranges.append(rf)

    def post(_mod, _args, _out):
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post, always_call=True)


def _patch(owner, attr: str, name: str) -> bool:
    raw = inspect.getattr_static(owner, attr, None)
    if raw is None or getattr(getattr(raw, "__func__", raw), "_moe_truth", False):
        return False
    if isinstance(raw, staticmethod):
        setattr(owner, attr, staticmethod(_wrap(raw.__func__, name)))
    else:
        setattr(owner, attr, _wrap(raw, name))
    return True


def patch_functions() -> dict[str, str]:
    done = {}
    for mod_name, path, role in FUNCTIONS:
        try:
            owner = importlib.import_module(mod_name)
            *outer, attr = path.split(".")
            for part in outer:
                owner = getattr(owner, part)
            done[f"{mod_name}.{path}"] = role if _patch(owner, attr, range_name(role, path)) else "missing"
        except (ImportError, AttributeError) as e:
            done[f"{mod_name}.{path}"] = f"missing ({type(e).__name__})"
    return done


def hook_model(model) -> dict[str, int]:
    paths: dict[int, list[str]] = {}
    modules = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
        modules[id(mod)] = mod
    moe_parents = set()
    for key, mod in modules.items():
        if any(module_role(paths[id(c)], c, False) == "moe" for c in mod.children()):
            moe_parents.add(key)
    count: dict[str, int] = {}
    for key, mod in modules.items():
        role = module_role(paths[key], mod, key in moe_parents)
        if role:
            _hook_module(mod, range_name(role, min(paths[key], key=len) or "root"))
            count[role] = count.get(role, 0) + 1
    if hasattr(model, "compute_logits"):
        model.compute_logits = _wrap(model.compute_logits, range_name("logits", "compute_logits"))
        count["logits"] = count.get("logits", 0) + 1
    return count


def _on_worker(worker) -> dict:
    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    out = {"runner": type(runner).__module__, "modules": hook_model(model)}
    sampler = getattr(runner, "sampler", None)
    name = range_name("sampler", type(sampler).__qualname__)
    if hasattr(sampler, "register_forward_pre_hook"):  # the V1 runner's Sampler is a module
        _hook_module(sampler, name)
        out["sampler"] = "hooked"
    elif sampler is not None:  # the V2 runner's is a plain class
        out["sampler"] = "patched" if _patch(type(sampler), "__call__", name) else "missing"
    return out


def install(llm) -> dict:
    """Wrap the functions and hook the model of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    functions = patch_functions()
    (worker,) = llm.collective_rpc(_on_worker)
    return {"functions": functions, **worker}
