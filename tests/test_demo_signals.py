"""`moe-monitor demo` stopped by SIGTERM (a supervisor, `kill`, `timeout`) stops what it started, like Ctrl-C
does: no vLLM, sidecar, Prometheus or Alertmanager is left running (issue #14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import free_port, have

pytestmark = pytest.mark.skipif(not have("vllm"), reason="needs vLLM")


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(pid) != os.getpid():
            found.append((int(pid), cmd[:200]))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_sigterm_stops_everything_the_demo_started(tmp_path, tiny_model, sig):
    workdir = tmp_path / "demo"
    os.makedirs(workdir)
    os.symlink(tiny_model[0] if isinstance(tiny_model, tuple) else tiny_model, workdir / "model")  # no generation
    demo = subprocess.Popen([sys.executable, "-m", "moe_monitor.cli", "demo", "--workdir", str(workdir),
                             "--no-alerting", "--vllm-port", str(free_port()), "--sidecar-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # until vLLM and the sidecar run (vLLM need not be ready)
        while time.monotonic() < deadline:
            if (workdir / "sidecar.log").exists() and len(processes_mentioning(str(workdir))) >= 3:
                break
            assert demo.poll() is None, demo.stdout.read().decode()
            time.sleep(0.5)
        started = processes_mentioning(str(workdir))
        assert any("serve" in c for _, c in started), started
        demo.send_signal(sig)
        assert demo.wait(60) == 0
        deadline = time.monotonic() + 30
        while processes_mentioning(str(workdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert processes_mentioning(str(workdir)) == [], "left running after SIGTERM"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
        for pid, _ in processes_mentioning(str(workdir)):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
