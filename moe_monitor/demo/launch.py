"""Start and stop a real vLLM OpenAI server and the sidecar as subprocesses (demo and end-to-end tests)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

SERVED_NAME = "tiny-moe"
EXTRA_ARGS_ENV = "MOE_MONITOR_VLLM_EXTRA_ARGS"  # more vLLM flags for the demo and the tests (shell words)

# vLLM's CPU build: float32 (routing then equals a float32 transformers replay exactly), memory in GiB of RAM.
CPU_ARGS = ("--dtype", "float32", "--gpu-memory-utilization", "0.5")
# A GPU: bf16 as users serve, torch.compile + CUDA graphs (vLLM's defaults), a small share of the card.
GPU_ARGS = ("--dtype", "bfloat16", "--gpu-memory-utilization", "0.2")


def has_gpu() -> bool:
    """An NVIDIA GPU is visible (nvidia-smi lists one); decided without importing torch."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def free_port() -> int:
    """A TCP port free on loopback right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    url: str
    started: float = field(default_factory=time.monotonic)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, path: str, timeout_s: float) -> float:
        """Poll url+path until it answers 200. Returns seconds since start; raises with the log tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def spawn(name: str, cmd: list[str], env: dict[str, str], log_path: str, url: str) -> Proc:
    log = open(log_path, "ab")
    popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return Proc(name, popen, log_path, url)


def vllm_env(segment_dir: str, publish_interval: float = 1.0, plugin: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "MOE_MONITOR_SEGMENT_DIR": segment_dir,
        "MOE_MONITOR_PUBLISH_INTERVAL": str(publish_interval),
        "TOKENIZERS_PARALLELISM": "false",
    })
    if not plugin:
        env["VLLM_PLUGINS"] = ""  # loads no general plugin at all: the "without moe-monitor" baseline
    return env


def start_vllm(model_dir: str, port: int, log_path: str, env: dict[str, str], extra_args: list[str] = (),
               gpu: bool = False) -> Proc:
    """vLLM's OpenAI server; later flags win, so extra_args (then $MOE_MONITOR_VLLM_EXTRA_ARGS) override the
    platform defaults."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           *(GPU_ARGS if gpu else CPU_ARGS), "--max-model-len", "1024", "--no-enable-prefix-caching",
           "--seed", "0", *extra_args, *shlex.split(env.get(EXTRA_ARGS_ENV, ""))]
    return spawn("vllm", cmd, env, log_path, f"http://127.0.0.1:{port}")


def start_sidecar(segment_dir: str, port: int, log_path: str, extra_args: list[str] = (),
                  env: dict[str, str] | None = None) -> Proc:
    """`moe-monitor serve` on loopback; `env` adds to this process's environment (a token: not in argv, `ps`)."""
    cmd = [sys.executable, "-m", "moe_monitor.cli", "serve", "--segment-dir", segment_dir,
           "--listen", f"127.0.0.1:{port}", *extra_args]
    return spawn("sidecar", cmd, {**os.environ, **(env or {})}, log_path, f"http://127.0.0.1:{port}")
