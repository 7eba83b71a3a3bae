"""The few CUDA driver calls the step hooks make, through ctypes: 1.6-2.3 us of host time each alone, where a Triton
launch from Python costs 11-22 us and torch's `Event.record()` 6-7 us (benchmarks/cuda_call_cost.py on an H100;
inside vLLM's step every call costs more: benchmarks/results/plugin_host_cost_h100.md).

- `write_u64(stream, address, value)`: cuStreamWriteValue64, the step's token count into the recorder's device
  scalar in stream order: no kernel, no source buffer to keep alive while the device is behind.
- events: cuEventCreate / cuEventRecord / cuEventQuery / cuEventElapsedTime for the step timer.

libcuda is loaded with `ctypes.PyDLL`: the GIL stays held over each call (they queue work, they never wait for the
device). A plain CDLL would release it for every call and let the publisher thread take it in the middle of vLLM's
step. Every call is made on vLLM's worker thread between steps, like the torch calls they replace (docs/recorder.md,
"Capture safety"). `load()` proves the calls on the device before the plugin relies on them and returns None
wherever one is missing or misbehaves; the plugin then keeps its torch and Triton paths.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600


class DriverError(RuntimeError):
    pass


def _symbol(lib, *names):
    for name in names:  # the _v2 entry points first: the headers of CUDA >= 12 map the plain names onto them
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    raise DriverError(f"libcuda has none of {names}")


class Driver:
    def __init__(self, lib):
        u64, vp, u32 = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint
        self._write = _symbol(lib, "cuStreamWriteValue64_v2", "cuStreamWriteValue64")
        self._write.argtypes, self._write.restype = [vp, u64, u64, u32], ctypes.c_int
        self._create = _symbol(lib, "cuEventCreate")
        self._create.argtypes, self._create.restype = [ctypes.POINTER(vp), u32], ctypes.c_int
        self._record = _symbol(lib, "cuEventRecord")
        self._record.argtypes, self._record.restype = [vp, vp], ctypes.c_int
        self._query = _symbol(lib, "cuEventQuery")
        self._query.argtypes, self._query.restype = [vp], ctypes.c_int
        self._elapsed = _symbol(lib, "cuEventElapsedTime_v2", "cuEventElapsedTime")
        self._elapsed.argtypes, self._elapsed.restype = [ctypes.POINTER(ctypes.c_float), vp, vp], ctypes.c_int
        self._ms = ctypes.c_float()
        self._ms_ref = ctypes.byref(self._ms)

    def write_u64(self, stream: int, address: int, value: int) -> None:
        """Write `value` to device memory at `address` once `stream` reaches this point (with a memory fence
        before it: earlier work on the stream is visible first)."""
        rc = self._write(stream, address, value, 0)
        if rc:
            raise DriverError(f"cuStreamWriteValue64 failed: CUresult {rc}")

    def event(self) -> int:
        handle = ctypes.c_void_p()
        rc = self._create(ctypes.byref(handle), 0)  # CU_EVENT_DEFAULT: timing on, spin on sync (never synced)
        if rc:
            raise DriverError(f"cuEventCreate failed: CUresult {rc}")
        return handle.value

    def record(self, event: int, stream: int) -> None:
        rc = self._record(event, stream)
        if rc:
            raise DriverError(f"cuEventRecord failed: CUresult {rc}")

    def done(self, event: int) -> bool:
        """Has the device passed the event? Never waits."""
        rc = self._query(event)
        if rc == CUDA_ERROR_NOT_READY:
            return False
        if rc:
            raise DriverError(f"cuEventQuery failed: CUresult {rc}")
        return True

    def elapsed_s(self, start: int, end: int) -> float | None:
        """Seconds between two events (resolution about 0.5 us), None while either is not complete: one call
        answers both questions. Never waits."""
        rc = self._elapsed(self._ms_ref, start, end)
        if rc == CUDA_ERROR_NOT_READY:
            return None
        if rc:
            raise DriverError(f"cuEventElapsedTime failed: CUresult {rc}")
        return self._ms.value / 1000.0


def current_stream_getter(device_index: int):
    """A function returning the raw handle of the current CUDA stream of the device: torch's own accessor (the one
    Triton's launcher uses, ~0.2 us) where it exists, else the public API."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: raw(device_index)
    return lambda: torch.cuda.current_stream(device_index).cuda_stream


def load(device) -> tuple[Driver, object] | None:
    """(the driver calls, the current-stream getter) proven on `device`, or None (logged) where they cannot be used.
    Runs on vLLM's worker thread at attach time, before any graph capture; it synchronises the device once."""
    import torch

    try:
        driver = Driver(ctypes.PyDLL("libcuda.so.1"))
        stream = current_stream_getter(device.index if device.index is not None else torch.cuda.current_device())
        scratch = torch.zeros(2, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        start, end = driver.event(), driver.event()
        driver.record(start, stream())
        driver.write_u64(stream(), scratch.data_ptr() + 8, (1 << 40) + 7)
        driver.record(end, stream())
        torch.cuda.synchronize(device)
        got = scratch.tolist()
        if got != [0, (1 << 40) + 7]:
            raise DriverError(f"cuStreamWriteValue64 wrote {got} where [0, {(1 << 40) + 7}] was expected")
        if not (driver.done(end) and (driver.elapsed_s(start, end) or -1.0) >= 0.0):
            raise DriverError("an event recorded before a device synchronisation is not complete after it")
        return driver, stream
    except Exception as e:  # noqa: BLE001 - any failure here means "use the torch and Triton paths"
        log.warning("moe-monitor: the CUDA driver's stream-write and event calls are not usable here (%s); the step "
                    "hooks use torch events and a Triton kernel instead (about 100 us more host time a step)", e)
        return None
