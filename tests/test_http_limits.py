"""The real `moe-monitor serve` process against clients that hold connections (issue #14, defect 6): with a low
descriptor limit, 300 idle clients made every scrape time out and the log grow by hundreds of MB. Now idle and
slow connections are closed, a connection cap keeps the process off EMFILE, and /metrics keeps answering."""

from __future__ import annotations

import http.client
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import free_port

from moe_monitor.demo import launch
from moe_monitor.sidecar import http_guard as server
from moe_monitor.sidecar.config import SidecarConfig

SEGMENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "segments", "t0", "dp0-pp0-tp0.moeseg")
NOFILE = 128  # the sidecar's descriptor limit: 300 clients are well past it
HEADER_S, IDLE_S = 2.0, 5.0  # the sidecar's timeouts here (defaults 10 s and 15 s), to keep the test short; apart,
# so that the header deadline is seen to act on its own (recent aiohttp closes a silent connection after IDLE_S)


def start_sidecar(tmp_path) -> launch.Proc:
    """`moe-monitor serve` under RLIMIT_NOFILE=NOFILE, with short HTTP timeouts."""
    segments = tmp_path / "seg"
    segments.mkdir()
    shutil.copy(SEGMENT, segments)
    port = free_port()
    env = dict(os.environ, MOE_MONITOR_HTTP_HEADER_TIMEOUT=str(HEADER_S), MOE_MONITOR_HTTP_IDLE_TIMEOUT=str(IDLE_S))
    cmd = [sys.executable, "-m", "moe_monitor.cli", "serve", "--segment-dir", str(segments),
           "--listen", f"127.0.0.1:{port}", "--window", "1", "--stale-after", "1000000000"]
    log_path = str(tmp_path / "sidecar.log")
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
    sidecar = launch.Proc("sidecar", popen, log_path, f"http://127.0.0.1:{port}")
    sidecar.wait_ready("/healthz", 20)
    return sidecar


def scrape_seconds(url: str) -> float:
    """Seconds a GET of /metrics took to answer 200 (inf when it failed or took over 5 s)."""
    began = time.monotonic()
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            r.read()
            ok = r.status == 200
    except OSError:
        ok = False
    return time.monotonic() - began if ok else float("inf")


def open_connections(host: str, port: int, n: int, first: bytes) -> list[socket.socket]:
    """Up to n connections that sent `first`; fewer when the server stops accepting (the old one hit EMFILE and
    its kernel queue filled up)."""
    out = []
    for _ in range(n):
        try:  # a SYN dropped while the kernel queue is full is resent after 1 s
            s = socket.create_connection((host, port), timeout=3)
        except OSError:
            break
        out.append(s)
        s.sendall(first)
    return out


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""  # FIN
    except BlockingIOError:
        return False  # still open, nothing sent
    except OSError:
        return True  # reset


@pytest.mark.slow
def test_idle_and_slow_clients_neither_starve_scrapes_nor_flood_the_log(tmp_path):
    sidecar = start_sidecar(tmp_path)
    host, port = sidecar.url.removeprefix("http://").split(":")
    clients, stop = [], threading.Event()

    def drip(slow):  # slowloris: a byte of an endless header every half second
        while not stop.wait(0.5):
            for s in slow:
                try:
                    s.send(b"X")
                except OSError:
                    pass

    try:
        idle = open_connections(host, int(port), 300, b"")  # connect, send nothing
        slow = open_connections(host, int(port), 20, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        clients += idle + slow
        opened = time.monotonic()
        threading.Thread(target=drip, args=(slow,), daemon=True).start()

        latencies = []
        for _ in range(3):  # during the flood (the cap is 48 here: the oldest idle connections make way)
            latencies.append(scrape_seconds(sidecar.url))
            if latencies[-1] > 2:
                break
            time.sleep(0.3)
        log_bytes = os.path.getsize(sidecar.log_path)
        assert max(latencies) < 2 and log_bytes < 100_000 and len(clients) == 320, \
            f"scrapes took {latencies} s during the flood, {len(clients)} of 320 clients got a connection; " \
            f"the log holds {log_bytes} bytes"

        time.sleep(opened + HEADER_S + 1.5 - time.monotonic())
        still_open = sum(not closed_by_server(s) for s in clients)
        assert still_open == 0, f"{still_open} of {len(clients)} connections without a complete request still open"

        keepalive = http.client.HTTPConnection(host, int(port), timeout=5)  # a scraper that keeps its connection
        keepalive.request("GET", "/metrics")
        response = keepalive.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close
        time.sleep(IDLE_S + 1.5)
        assert closed_by_server(keepalive.sock), "an idle keep-alive connection outlived the idle timeout"
        keepalive.close()

        assert scrape_seconds(sidecar.url) < 2
        log = sidecar.log_tail(200)
        assert "Too many open files" not in log, log
        assert os.path.getsize(sidecar.log_path) < 100_000
    finally:
        stop.set()
        for s in clients:
            s.close()
        sidecar.stop()


def test_the_connection_cap_and_backlog_fit_the_descriptor_limit(monkeypatch):
    limits = server.HttpLimits()
    for nofile, expected in (((128, 128), (48, 16)), ((1024, 4096), (256, 128)), ((64, 64), (8, 8)),
                             ((resource.RLIM_INFINITY, resource.RLIM_INFINITY), (256, 128))):
        monkeypatch.setattr(resource, "getrlimit", lambda _, nofile=nofile: nofile)
        assert limits.sized_to_fd_limit() == expected, nofile


def test_http_limits_are_settings_with_environment_twins(tmp_path):
    """A bad value is refused by `serve`, naming the flag and its variable; a good one reaches the server."""
    from click.testing import CliRunner

    from moe_monitor.cli import main
    from moe_monitor.settings import build

    result = CliRunner().invoke(main, ["serve", "--segment-dir", str(tmp_path)],
                                env={"MOE_MONITOR_HTTP_HEADER_TIMEOUT": "soon"})
    assert result.exit_code == 2 and "MOE_MONITOR_HTTP_HEADER_TIMEOUT" in result.output, result.output
    cfg = build(SidecarConfig, {"http_idle_timeout_s": 3.0, "http_max_connections": 9})
    assert server.HttpLimits.of(cfg) == server.HttpLimits(3.0, server.HEADER_TIMEOUT_S, 9)


def test_a_repeated_event_loop_error_is_logged_once_a_minute_with_a_count(monkeypatch, caplog):
    """What flooded the log: accept() failing with EMFILE, reported up to 128 times per wake-up by asyncio."""
    import asyncio

    clock = [1000.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(server.LoopErrorLog(server.Refusals()))
        emfile = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        for _ in range(1000):
            loop.call_exception_handler(emfile)
        clock[0] += server.LOG_EVERY_S
        loop.call_exception_handler(emfile)
    finally:
        loop.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 2 and "999 more like it" in logged[1], logged
