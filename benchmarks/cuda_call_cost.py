"""Host time of each CUDA call the plugin's step hooks could make, alone in a tight loop (issue #27): what a
microsecond buys. Median and p10 ns per call over N calls, with the device idle and with it busy (a long sleep
kernel queued first, as under vLLM, where the host runs ahead of the device).

    . .gpu/device-env.sh; python3 benchmarks/cuda_call_cost.py
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch


def cost(fn, n: int = 2000) -> tuple[float, float]:
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return statistics.median(times), times[n // 10]


def after_replay(fn, graph, n: int = 300) -> tuple[float, float]:
    """The call's host time right after a CUDA graph's launch (as the plugin's step_end follows vLLM's forward):
    the device idle before each replay, so the call meets the graph still being submitted and run."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        graph.replay()
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return statistics.median(times), times[n // 10]


def graph_of(nodes: int, dev: torch.device) -> torch.cuda.CUDAGraph:
    """A graph of `nodes` small kernels (a vLLM decode graph of a 24-layer MoE has ~500-1000)."""
    x = torch.zeros(4096, device=dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(nodes):
            x.add_(1)
    return graph


def main() -> None:
    from moe_monitor.plugin import cuda_driver, triton_flush

    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)
    driver, stream = cuda_driver.load(dev)
    raw = stream()
    lib_py, lib_c = ctypes.PyDLL("libcuda.so.1"), ctypes.CDLL("libcuda.so.1")
    scratch = torch.zeros(4, dtype=torch.int64, device=dev)
    addr = scratch.data_ptr()
    pinned = torch.zeros(1024, dtype=torch.int64, pin_memory=True)
    ev, ev2 = driver.event(), driver.event()
    driver.record(ev, raw)
    tev = torch.cuda.Event(enable_timing=True)
    tev.record()
    vu64, vp = ctypes.c_uint64, ctypes.c_void_p
    w_py = lib_py.cuStreamWriteValue64_v2
    w_py.argtypes, w_py.restype = [vp, vp, vu64, ctypes.c_uint], ctypes.c_int
    w_c = lib_c.cuStreamWriteValue64_v2
    w_c.argtypes, w_c.restype = [vp, vp, vu64, ctypes.c_uint], ctypes.c_int
    rec_c = lib_c.cuEventRecord
    rec_c.argtypes, rec_c.restype = [vp, vp], ctypes.c_int
    h2d = lib_py.cuMemcpyHtoDAsync_v2
    h2d.argtypes, h2d.restype = [vp, vp, ctypes.c_size_t, vp], ctypes.c_int
    nop = lib_py.cuCtxGetDevice
    devp = ctypes.c_int()
    nop.argtypes, nop.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    counts = torch.zeros(2, 129, dtype=torch.int64, device=dev)
    mirror = torch.zeros(2, 128, dtype=torch.int64, pin_memory=True)
    ids = torch.zeros(2, 8, 8, dtype=torch.int32, device=dev)
    rows = torch.arange(2, device=dev)
    valid = torch.zeros((), dtype=torch.int64, device=dev)
    triton_flush.warm_up(dev, 128, 8)
    sc = (valid, torch.zeros((), dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int32,
                                                                                      device=dev))
    calls = {
        "python no-op call": lambda: None,
        "torch._C._cuda_getCurrentRawStream": lambda: stream(),
        "ctypes PyDLL cuCtxGetDevice (no device work)": lambda: nop(ctypes.byref(devp)),
        "ctypes PyDLL cuStreamWriteValue64 (fence)": lambda: w_py(raw, addr, 7, 0),
        "ctypes PyDLL cuStreamWriteValue64 (no fence)": lambda: w_py(raw, addr, 7, 1),
        "ctypes CDLL cuStreamWriteValue64 (fence)": lambda: w_c(raw, addr, 7, 0),
        "Driver.write_u64 (plugin path)": lambda: driver.write_u64(stream(), addr, 7),
        "ctypes PyDLL cuMemcpyHtoDAsync 8 B pinned": lambda: h2d(addr, pinned.data_ptr(), 8, raw),
        "Driver.record (cuEventRecord)": lambda: driver.record(ev, raw),
        "ctypes CDLL cuEventRecord": lambda: rec_c(ev, raw),
        "Driver.done (cuEventQuery)": lambda: driver.done(ev2),
        "torch Event.record()": lambda: tev.record(),
        "torch Event.query()": lambda: tev.query(),
        "torch fill_ on a device scalar": lambda: valid.fill_(3),
        "torch copy_ pinned->device non_blocking": lambda: scratch[0].copy_(pinned[0], non_blocking=True),
        "Triton set_valid_tokens (JIT launch)": lambda: triton_flush.set_valid_tokens(valid, 3),
        "Triton count_stacked (JIT launch)": lambda: triton_flush.count_stacked(counts, mirror, ids, rows, sc, 128),
        "torch.stack of 24 [8,8] ids": (lambda xs: lambda: torch.stack(xs))([ids[0]] * 24),
    }
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1000 * 0.3)
    for busy in (False, True):
        torch.cuda.synchronize()
        print(f"--- device {'busy (a 0.3 s sleep kernel queued first)' if busy else 'idle'}")
        for name, fn in calls.items():
            if busy:
                torch.cuda._sleep(cycles)
            n = 500 if "Triton" in name or "torch" in name else 2000
            med, p10 = cost(fn, n)
            print(f"{name:48s} median {med / 1e3:7.2f} us  p10 {p10 / 1e3:7.2f} us", flush=True)
            torch.cuda.synchronize()
    for nodes in (10, 500, 2000):
        graph = graph_of(nodes, dev)
        graph.replay()
        torch.cuda.synchronize()
        print(f"--- right after launching a CUDA graph of {nodes} kernels (device idle before the launch)")
        for name in ("python no-op call", "Driver.record (cuEventRecord)", "Driver.write_u64 (plugin path)",
                     "Driver.done (cuEventQuery)", "torch Event.record()", "torch fill_ on a device scalar"):
            med, p10 = after_replay(calls[name], graph)
            print(f"{name:48s} median {med / 1e3:7.2f} us  p10 {p10 / 1e3:7.2f} us", flush=True)
        t = time.perf_counter_ns()
        for _ in range(50):
            torch.cuda.synchronize()
            graph.replay()
        print(f"{'(graph.replay itself, incl. a sync before)':48s} mean {(time.perf_counter_ns() - t) / 50e3:7.2f} us")
    driver.record(ev2, raw)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
