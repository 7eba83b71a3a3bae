"""Issue #26 item 6: health that says something. Before, /healthz always answered ok, `serve --segment-dir
/nonexistent` logged nothing, and with its port taken the sidecar logged "listening on" before the bind error.
Now /readyz (unauthenticated, like /healthz) answers 503 with the reason until fresh segments are there and the
window loop runs, a missing or empty segment directory is a warning at once (and again while it lasts), and the
port is bound before anything is announced. On the real `moe-monitor serve`, fed by the plugin's segment writer."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from test_top import Feeder

from moe_monitor.demo import launch
from moe_monitor.sidecar.readiness import REPEAT_S, SegmentDirLog, SegmentsSeen, readiness

TOKEN = "s3cret"


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def until(url: str, status: int, timeout: float = 20, text: str = "") -> tuple[float, str]:
    """Poll `url` until it answers `status` (with `text` in its body): (seconds it took, body)."""
    began = time.monotonic()
    while True:
        got, body = get(url)
        if got == status and text in body:
            return time.monotonic() - began, body
        assert time.monotonic() - began < timeout, f"still {got} {body!r} after {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_readyz_follows_the_segment_directory_and_the_log_says_why(tmp_path):
    seg = tmp_path / "seg"  # missing at start
    sidecar = launch.start_sidecar(str(seg), free_port(), str(tmp_path / "sidecar.log"),
                                   ["--window", "1", "--stale-after", "2", "--api-token", TOKEN])
    feeder = None
    try:
        sidecar.wait_ready("/healthz", 30)
        log = open(sidecar.log_path).read()
        missing = f"the segment directory {seg} does not exist"
        assert missing in log and log.index(missing) < log.index("listening on"), "warned at once, at start"
        status, body = get(sidecar.url + "/readyz")  # no token: open like /healthz, whatever --api-token says
        assert (status, body) == (503, f"not ready: {missing} (vLLM with moe-monitor creates it; its "
                                        "MOE_MONITOR_SEGMENT_DIR must name the directory --segment-dir names)\n")

        seg.mkdir()
        _, body = until(sidecar.url + "/readyz", 503, text="no segment in")
        assert body.startswith(f"not ready: no segment in {seg} yet")

        feeder = Feeder(str(seg))
        took, body = until(sidecar.url + "/readyz", 200)
        print(f"\n/readyz 503 -> 200 {took:.1f} s after the first segment (1 s windows): {body.strip()}")
        assert body.startswith("ready: 1 of 1 segments fresh") and took < 5

        feeder.close()  # vLLM gone: the segment goes stale after --stale-after 2 s
        feeder = None
        took, body = until(sidecar.url + "/readyz", 503)
        print(f"/readyz 200 -> 503 {took:.1f} s after the last publish: {body.strip()}")
        assert f"no fresh segment in {seg}: 1 segments, the newest published" in body and 1.5 < took < 8
        assert get(sidecar.url + "/healthz") == (200, "ok\n"), "the process is alive all along"
        log = open(sidecar.log_path).read()
        assert f"reading segments in {seg} again: 1 fresh" in log
        assert log.count(f"no fresh segment in {seg}") == 1 and "/readyz answers 503" in log
    finally:
        if feeder is not None:
            feeder.close()
        sidecar.stop()


def test_a_taken_port_is_an_error_before_anything_is_announced(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "serve", "--segment-dir", str(tmp_path),
                            "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        took = time.monotonic() - began
    out = r.stdout + r.stderr
    assert r.returncode == 1 and f"Error: cannot listen on 127.0.0.1:{port}" in out and "in use" in out, out
    assert "listening on" not in out and "access:" not in out, out
    assert took < 30


def seen(at: float, dir_exists: bool = True, total: int = 1, fresh: int = 1, age: float | None = 0.5):
    return SegmentsSeen(at, dir_exists, total, fresh, age)


def test_readiness_names_a_stopped_or_stuck_window_loop():
    args = dict(window_s=5.0, stale_after_s=30.0, segment_dir="/seg")
    assert readiness(100.0, seen(99), 99.0, True, **args) == (True, "1 of 1 segments fresh, the last window built "
                                                                     "1.0 s ago")
    assert readiness(100.0, None, None, True, **args)[1].startswith("no exposition yet")
    assert readiness(100.0, seen(99), 99.0, False, **args) == (False, "the window loop has stopped (see the "
                                                                      "sidecar's log)")
    ready, why = readiness(100.0, seen(70), 70.0, True, **args)  # 30 s > 3 windows + 10 s
    assert not ready and why.startswith("the window loop has built nothing for 30 s (5 s windows)")
    assert readiness(100.0, seen(99), 76.0, True, **args)[0], "24 s is within 3 windows + 10 s"


def test_the_segment_directory_warnings_repeat_while_it_lasts_and_end_when_it_is_read():
    said = SegmentDirLog("/seg", stale_after_s=30)
    missing = [said.observe(seen(t, dir_exists=False, total=0, fresh=0, age=None)) for t in range(0, 601, 5)]
    warned = [(i * 5, m) for i, m in enumerate(missing) if m]
    assert [t for t, _ in warned] == [0, REPEAT_S, 2 * REPEAT_S] and warned[0][1][0] == logging.WARNING
    assert said.observe(seen(605, total=0, fresh=0, age=None)) is None, "an empty directory: not at once"
    empty = said.observe(seen(665, total=0, fresh=0, age=None))
    assert empty[1].startswith("no segment in /seg after 60 s (is vLLM running with moe-monitor installed")
    assert said.observe(seen(670)) == (logging.INFO, "reading segments in /seg again: 1 fresh")
    assert said.observe(seen(675)) is None
