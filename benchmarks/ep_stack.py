"""An expert-parallel MoE stack over torch.distributed, one process per rank: gloo on CPU, NCCL on GPUs.

Each rank routes its own tokens (its own seed; the gate is the same model on every rank), taps the router's
top-k ids into the plugin's `Recorder` (exactly what vLLM's router capture slot hands the plugin), exchanges
split sizes, dispatches one row per (token, expert) assignment with `all_to_all_single` to the rank that owns
the expert (contiguous placement: rank r owns experts [r*E/W, (r+1)*E/W), vLLM's default), runs its local
experts (two `torch._grouped_mm` with SwiGLU, as in moe_stack.py), sends the results back with a second
`all_to_all_single` and combines them with the routing weights.

What the ranks write under --out (docs/ep.md):

    segments/dp<r>-pp0-tp<0>.moeseg   the plugin's segment of each rank after the last step (real Publisher +
                                      SegmentWriter; ranks as vLLM reports DP=W x TP=1 with EP: dp_rank =
                                      ep_rank = r, so the sidecar sums the ranks, no TP dedupe)
    segments_mid/...                  the same files copied after half of the counted steps (a window baseline)
    ground_truth.json                 per rank and layer: the (token, expert) assignments it RECEIVED in the
                                      dispatch all-to-all, per local expert, at both snapshots; what it sent
    traces/ep_stack_dp<r>_pp0_tp0_ep<r>_rank<r>.pt.trace.json.gz   with --profile: the last steps

Rank 0 checks at the end, from the segment files with the sidecar's own reader and placement code, that the
per-EP-rank load equals what the ranks received, and exits non-zero otherwise.

    python benchmarks/ep_stack.py --backend gloo --device cpu --out /tmp/ep --profile           # here
    python benchmarks/ep_stack.py --backend nccl --device cuda --out $OUT --profile ...         # 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/ep_stack.py --backend nccl --device cuda ...         # same thing
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import time

# NVLink multicast (NVLS) off, before torch / NCCL / NVSHMEM initialise, here and in the ranks this spawns.
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_monitor.channel import Ranks, SegmentWriter, Shape, read_segment  # noqa: E402
from moe_monitor.demo.launch import free_port  # noqa: E402
from moe_monitor.plugin.attach import Attachment, MoELayer  # noqa: E402
from moe_monitor.plugin.publisher import Publisher  # noqa: E402
from moe_monitor.plugin.recorder import MODES, Recorder, default_mode  # noqa: E402
from moe_monitor.plugin.steps import StepStats  # noqa: E402
from moe_monitor.stats.imbalance import rank_imbalance  # noqa: E402
from moe_monitor.stats.placement import contiguous  # noqa: E402

MODEL = "ep-stack"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world-size", type=int, default=2, help="ranks when spawning (torchrun sets its own)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8, help="logical experts, split evenly over the ranks")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=None, help="expert intermediate size (default: hidden)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    p.add_argument("--steps", type=int, default=6, help="counted steps (after --warmup uncounted ones)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted steps first (valid_tokens = 0, like vLLM's "
                   "dummy runs): they route and dispatch, the recorder must not count them")
    p.add_argument("--hot-expert", type=int, default=None, help="bias the gate towards this expert in every layer")
    p.add_argument("--hot-bias", type=float, default=1.5, help="logit bias of the hot expert")
    p.add_argument("--seed", type=int, default=0, help="model seed; rank r draws its tokens from seed + 1 + r")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA (torch._grouped_mm on CUDA wants bf16)")
    p.add_argument("--recorder", choices=MODES, default=None, help="default: the plugin's default for the device "
                   "(per_layer on CPU, fused on CUDA)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--profile", action="store_true", help="torch.profiler over the last --profile-steps steps")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    a = p.parse_args(argv)
    a.intermediate = a.intermediate or a.hidden
    if a.hot_expert is not None and not 0 <= a.hot_expert < a.experts:
        p.error(f"--hot-expert must be in [0, {a.experts})")
    if not 1 <= a.top_k <= a.experts:
        p.error("--top-k must be in [1, experts]")
    if a.profile and not 1 <= a.profile_steps <= a.steps:
        p.error("--profile-steps must be in [1, steps]")
    if a.steps < 2:
        p.error("--steps must be >= 2 (a mid snapshot and a final one)")
    return a


class EPStack:
    """L MoE layers; this rank holds the gate (the same on every rank) and its E/W experts."""

    def __init__(self, a: argparse.Namespace, rank: int, world: int, device: torch.device, dtype: torch.dtype):
        if a.experts % world:
            raise SystemExit(f"{a.experts} experts do not split evenly over {world} ranks")
        self.a, self.rank, self.world, self.device, self.dtype = a, rank, world, device, dtype
        L, E, H, inter = a.layers, a.experts, a.hidden, a.intermediate
        self.per_rank = E // world
        self.first = rank * self.per_rank  # first global expert id this rank owns
        g = torch.Generator().manual_seed(a.seed)  # the same model on every rank
        self.gate = (torch.randn(L, E, H, generator=g) * H ** -0.5).to(device, dtype)
        bias = torch.zeros(E)
        if a.hot_expert is not None:
            bias[a.hot_expert] = a.hot_bias
        self.gate_bias = bias.to(device, dtype)
        self.norm = torch.ones(H, device=device, dtype=dtype)
        g.manual_seed(a.seed + 1000 + rank)  # this rank's experts
        # [L, e, N, K] stored, passed transposed: the column-major B operand _grouped_mm wants.
        self.w13 = (torch.randn(L, self.per_rank, 2 * inter, H, generator=g) * H ** -0.5).to(device, dtype)
        self.w2 = (torch.randn(L, self.per_rank, H, inter, generator=g) * inter ** -0.5).to(device, dtype)
        # Ground truth, counted from what arrives (not from the router): [L, local experts] and what was sent.
        self.received = torch.zeros(L, self.per_rank, dtype=torch.int64, device=device)
        self.sent = torch.zeros(L, E, dtype=torch.int64, device=device)
        self.rows_received = [0] * L  # from the exchanged split sizes, a second independent count
        self.counting = False

    def route(self, row: int, h: torch.Tensor):
        logits = F.linear(h, self.gate[row], self.gate_bias)
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.a.top_k, dim=-1)
        return weights, ids.to(torch.int32)  # int32, as vLLM's routers return them

    def layer(self, row: int, x: torch.Tensor, recorder: Recorder) -> torch.Tensor:
        T, H, k = x.shape[0], self.a.hidden, self.a.top_k
        h = F.rms_norm(x, (H,), self.norm)
        weights, ids = self.route(row, h)
        recorder.record(row, ids)  # the plugin's tap
        flat = ids.reshape(-1).to(torch.int64)  # [T*k] one row per (token, expert) assignment
        order = torch.argsort(flat, stable=True)  # by expert id: contiguous placement groups by destination too
        send_counts = histogram(flat // self.per_rank, self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)  # split sizes first
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the one host sync of the layer
        eids = flat[order]
        xs = h[order // k]
        rx = h.new_empty((sum(recv), H))
        dist.all_to_all_single(rx, xs, recv, send)  # dispatch: hidden states
        rids = eids.new_empty(sum(recv))
        dist.all_to_all_single(rids, eids, recv, send)  # dispatch: their expert ids
        local = rids - self.first
        if self.counting:
            self.received[row].index_add_(0, local, torch.ones_like(local))  # fails loudly if not ours
            self.sent[row].index_add_(0, flat, torch.ones_like(flat))
            self.rows_received[row] += sum(recv)
        y = self.experts(row, rx, local)
        back = torch.empty_like(xs)
        dist.all_to_all_single(back, y, send, recv)  # combine: results return in dispatch order
        out = torch.empty_like(back)
        out[order] = back
        return x + (out.view(T, k, H) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)

    def experts(self, row: int, rx: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if rx.shape[0] == 0:
            return rx
        inter = self.a.intermediate
        lorder = torch.argsort(local, stable=True)
        offs = torch.cumsum(histogram(local, self.per_rank), 0).to(torch.int32)
        xr = rx[lorder]
        y = torch._grouped_mm(xr, self.w13[row].transpose(-2, -1), offs=offs)
        act = F.silu(y[:, :inter]) * y[:, inter:]
        y2 = torch._grouped_mm(act, self.w2[row].transpose(-2, -1), offs=offs)
        out = torch.empty_like(y2)
        out[lorder] = y2  # back to arrival order
        return out

    def step(self, x: torch.Tensor, recorder: Recorder) -> torch.Tensor:
        for row in range(self.a.layers):
            x = self.layer(row, x, recorder)
        return x


def histogram(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Counts of ids in [0, n) without a host sync (torch.bincount reads the max back on CUDA)."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def ranks_of(rank: int, world: int) -> Ranks:
    """vLLM with DP=W, TP=1 and expert parallelism: EP group = DP x TP, ep_rank = dp_rank. Distinct DP ranks
    route distinct tokens, so the sidecar sums them (it dedupes TP ranks of one (dp, pp) group only)."""
    return Ranks(global_rank=rank, world_size=world, dp_rank=rank, dp_size=world, tp_rank=0, tp_size=1,
                 pp_rank=0, pp_size=1, ep_rank=rank, ep_size=world)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(local_rank: int, a: argparse.Namespace, rank: int | None = None, world: int | None = None) -> None:
    rank = local_rank if rank is None else rank
    world = a.world_size if world is None else world
    if a.device == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise SystemExit(f"rank {rank} needs cuda:{local_rank}, {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(1)  # W ranks share the host's cores
        device = torch.device("cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    kwargs = {"device_id": device} if a.backend == "nccl" else {}
    dist.init_process_group(a.backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=a.timeout), **kwargs)
    try:
        run_rank(a, rank, world, device, dtype)
    finally:
        dist.destroy_process_group()
    if "RANK" not in os.environ:  # a torch.multiprocessing.spawn child (not torchrun) whose work is done
        # Exit without running C++ static destructors: under full-suite load a rank sometimes died there after
        # its work was done and checked ("terminate called without an active exception" right after the
        # profiler stopped, SIGABRT), failing a run whose results were right.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_rank(a, rank: int, world: int, device: torch.device, dtype: torch.dtype) -> None:
    L, E, T = a.layers, a.experts, a.tokens
    stack = EPStack(a, rank, world, device, dtype)
    recorder = Recorder(L, E, a.top_k, device, capacity=T, mode=a.recorder or default_mode(device))
    recorder.set_rows(list(range(L)))
    steps = StepStats()
    attachment = Attachment([MoELayer(i, f"model.layers.{i}.mlp", E, a.top_k, None, True) for i in range(L)])
    seg_dir, mid_dir = os.path.join(a.out, "segments"), os.path.join(a.out, "segments_mid")
    writer = SegmentWriter(seg_dir, MODEL, ranks_of(rank, world),
                           Shape(L, E, len(steps.token_bounds), len(steps.duration_bounds)), a.top_k)
    publisher = Publisher(writer, recorder, steps, attachment, interval_s=1.0)

    def publish() -> None:
        sync(device)  # finish the step: the counts the publisher reads are complete after it
        if not publisher.publish_once():
            raise RuntimeError(f"rank {rank}: publishing {writer.path} failed")

    publish()  # the segment exists (with zeros) before the first step, as the plugin does after load_model
    tokens = torch.Generator().manual_seed(a.seed + 1 + rank)  # each rank its own tokens
    step_name = f"execute_context_1({T})_generation_0(0)"  # vLLM's step range: the breakdown's steps and phases
    mid_at = a.steps // 2
    truth: dict[str, dict] = {}
    step_seconds = []
    profile_from = a.steps - a.profile_steps if a.profile else a.steps
    prof = trace_path = None
    if a.profile:
        trace_path = os.path.join(a.out, "traces", f"ep_stack_dp{rank}_pp0_tp0_ep{rank}_rank{rank}.pt.trace.json.gz")
        os.makedirs(os.path.dirname(trace_path), exist_ok=True)
    for i in range(-a.warmup, a.steps):
        if a.profile and prof is None and i >= profile_from - 1:
            # The step before the recorded ones is the profiler's warm-up (recorded, discarded): its start-up
            # cost, different on each rank, must not land in the first all-to-all of the recorded steps.
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            schedule = torch.profiler.schedule(wait=0, warmup=profile_from - i, active=a.profile_steps, repeat=1)
            prof = torch.profiler.profile(activities=activities, schedule=schedule,
                                          on_trace_ready=lambda p: p.export_chrome_trace(trace_path))
            prof.start()
        x = torch.randn(T, a.hidden, generator=tokens).to(device, dtype)
        counted = i >= 0
        stack.counting = counted
        if i < profile_from:  # (not in recorded steps: the trace would show the wait as a collective)
            dist.barrier()  # steps start together, so step times are the step's, not a wait for a late rank
        start = time.perf_counter()
        recorder.set_valid_tokens(T if counted else 0)  # the worker's step hook; 0 = dummy run
        with torch.profiler.record_function(step_name):
            x = stack.step(x, recorder)
            sync(device)
        recorder.set_valid_tokens(0)
        seconds = time.perf_counter() - start
        if counted:
            steps.record_step("prefill", T, seconds)
            step_seconds.append(seconds)
        if prof is not None:
            prof.step()
        if i + 1 == mid_at:
            publish()
            os.makedirs(mid_dir, exist_ok=True)
            shutil.copyfile(writer.path, os.path.join(mid_dir, os.path.basename(writer.path)))
            truth["mid"] = snapshot_truth(stack, i + 1)
    if prof is not None:
        prof.stop()
        assert os.path.exists(trace_path), f"the profiler wrote no trace to {trace_path}"
    publish()
    writer.close()
    truth["final"] = snapshot_truth(stack, a.steps)
    mine = {"rank": rank, "ep_rank": rank, "segment": os.path.basename(writer.path),
            "experts": [stack.first, stack.first + stack.per_rank], "recorder": recorder.mode,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "step_seconds": step_seconds, "trace": trace_path and os.path.relpath(trace_path, a.out), **truth}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        doc = {"run": run_info(a, world, device), "ranks": gathered}
        with open(os.path.join(a.out, "ground_truth.json"), "w") as f:
            json.dump(doc, f, indent=1)
        report = check(a.out, doc)
        print(report["text"], flush=True)
        if not report["ok"]:
            raise SystemExit("ep_stack: the segments do not match the all-to-all ground truth")
    # Leave together: a rank that tears the group down while the other still uses it can die in gloo's
    # teardown ("terminate called without an active exception", SIGABRT; seen once under full-suite load).
    dist.barrier()


def snapshot_truth(stack: EPStack, steps_done: int) -> dict:
    sync(stack.device)
    received = stack.received.cpu()
    assert received.sum(dim=1).tolist() == stack.rows_received, "expert ids and split sizes disagree"
    return {"steps": steps_done, "received": received.tolist(), "sent": stack.sent.cpu().tolist()}


def run_info(a, world: int, device: torch.device) -> dict:
    info = {"args": vars(a), "world_size": world, "torch": torch.__version__, "nvls_env": dict(NVLS_OFF),
            "placement": "contiguous", "model": MODEL}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return info


def received_by_rank(doc: dict, key: str) -> np.ndarray:
    """[L, W]: assignments each rank received in the dispatch all-to-all (sum over its local experts)."""
    return np.stack([np.asarray(r[key]["received"]).sum(axis=1) for r in doc["ranks"]], axis=1)


def received_by_expert(doc: dict, key: str) -> np.ndarray:
    """[L, E]: assignments received per global expert id (ranks own contiguous blocks, in rank order)."""
    return np.concatenate([np.asarray(r[key]["received"]) for r in doc["ranks"]], axis=1)


def check(out: str, doc: dict) -> dict:
    """The sidecar's view of the segments (its reader, its contiguous placement) against the ground truth."""
    lines, ok = [], True
    world = doc["run"]["world_size"]
    for key, folder in (("mid", "segments_mid"), ("final", "segments")):
        snaps = [read_segment(os.path.join(out, folder, r["segment"])) for r in doc["ranks"]]
        for r, s in zip(doc["ranks"], snaps):
            if not np.array_equal(s.counts, np.asarray(r[key]["sent"])):
                ok = False
                lines.append(f"{key}: rank {r['rank']}'s segment counts differ from what it routed")
        counts = sum(s.counts.astype(np.int64) for s in snaps)
        load = contiguous(counts.shape[1], snaps[0].header.ranks.ep_size).rank_load(counts)
        truth = received_by_rank(doc, key)
        match = np.array_equal(load, truth) and np.array_equal(counts, received_by_expert(doc, key))
        ok &= match
        lines.append(f"{key} ({doc['ranks'][0][key]['steps']} counted steps): per-EP-rank load from the segments "
                     f"{'==' if match else '!='} assignments received in the all-to-all")
        for layer in range(truth.shape[0]):
            lines.append(f"  layer {layer}: received {truth[layer].tolist()}  segments {load[layer].tolist()}")
    delta = received_by_rank(doc, "final") - received_by_rank(doc, "mid")
    ratio = rank_imbalance(delta)
    lines.append(f"window (mid -> final) EP-rank imbalance max/mean per layer: "
                 f"{[round(float(x), 4) for x in ratio]} over {world} ranks")
    return {"ok": bool(ok), "text": "\n".join(lines)}


def main(argv=None) -> None:
    a = parse_args(argv)
    if os.environ.get("RANK", "0") == "0":  # other torchrun ranks cannot write before rank 0 joins the group
        for folder in ("segments", "segments_mid", "traces"):  # a previous run's files would be read as ranks
            shutil.rmtree(os.path.join(a.out, folder), ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: one process per rank already
        worker(int(os.environ.get("LOCAL_RANK", 0)), a, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if a.backend == "gloo" and sys.platform.startswith("linux"):  # one host: loopback, whatever the hostname is
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(worker, args=(a,), nprocs=a.world_size, join=True)


if __name__ == "__main__":
    main()
