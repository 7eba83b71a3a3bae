"""The clients trust nothing the sidecar (or Prometheus) sends (issue #24, items 5, 8 and 9): the real CLI
against a hostile server (tests/hostile_server.py) that drips, sends 1 GiB, a gzip bomb, ids and file names
naming paths outside --out, and strings with terminal escape sequences. What a user sees is asserted: the exit
code, a one-line error, no file outside --out, the process' peak memory and that it ends."""

from __future__ import annotations

import gzip
import json
import os
import sys
import time

import pytest
from click.testing import CliRunner
from hostile_server import (
    GiB,
    HostileServer,
    drip,
    gzip_bomb,
    huge,
    json_answer,
    raw_answer,
    run_measured,
    stream_answer,
)

from moe_monitor.cli import main

MOE_MONITOR = [sys.executable, "-m", "moe_monitor.cli"]
ID = "20250101T000000Z-manual-abcdef"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07"
RSS_LIMIT_MB = 400
FLIGHT_HEAD = b'{"format": "moe-monitor-flight/1", "layer_ids": [0], "experts": 2, "windows": '


@pytest.fixture(scope="module")
def hostile():
    server = HostileServer()
    yield server
    server.close()


@pytest.fixture
def server(hostile):
    hostile.reset()
    return hostile


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """2 MB of gzip that inflates to 2 GiB (JSON whitespace after a flight record's first bytes)."""
    return gzip_bomb(2 * GiB, head=FLIGHT_HEAD)


def run(*args: str, kill_after: float = 120) -> tuple[int, str, float, float]:
    """The real CLI in a subprocess: (exit code, stderr, peak RSS in MB, seconds)."""
    code, _, err, rss, took = run_measured([*MOE_MONITOR, *args], kill_after)
    return code, err, rss, took


def invoke(*args: str):
    """The CLI in-process (fast), colour on so that click keeps escape sequences as they are."""
    return CliRunner().invoke(main, list(args), color=True)


def one_line_error(result, code: int = 1) -> str:
    """The error a user sees: exit `code`, one line `Error: ...`, no traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def meta(capture_id: str = ID, files=(("trace.json", 4),), **extra) -> dict:
    return {"id": capture_id, "created": 1.7e9, "reason": "manual", "outcome": "ok", "duration_s": 1.0,
            "files": [{"name": n, "bytes": b} for n, b in files], "total_bytes": sum(b for _, b in files), **extra}


def tree(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                  for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))])


# -- deadlines and size caps -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_server_that_drips_a_byte_every_2_s_ends_at_the_deadline(server):
    server.on("/api/captures", drip())
    code, err, _, took = run("traces", "--url", server.url, "--timeout", "5", "list", kill_after=100)
    assert code == 1 and "no complete answer from" in err and "within 5 s" in err, err
    assert took < 60


@pytest.mark.slow
def test_eplb_against_a_dripping_sidecar_ends_at_the_deadline(server):
    server.on("/api/flight", drip(b'{"format": "moe-monitor-flight/1", '))
    code, err, _, took = run("eplb", "--live", "--url", server.url, "--timeout", "5", "--gpus", "2", kill_after=100)
    assert code == 1 and "within 5 s" in err and took < 60, err


@pytest.mark.parametrize("args, route, body", [
    (["traces", "--url", "{url}", "list"], "/api/captures", huge(GiB)),
    (["traces", "--url", "{url}", "list"], "/api/captures", huge(GiB, announce=True)),
    (["eplb", "--live", "--url", "{url}", "--gpus", "2"], "/api/flight", huge(GiB, head=FLIGHT_HEAD)),
    (["eplb", "--prometheus", "{url}", "--gpus", "2"], "/api/v1/query",
     huge(GiB, head=b'{"status": "success", "data": {"result": ["')),
], ids=["traces-list", "traces-list-announced", "eplb-live", "eplb-prometheus"])
@pytest.mark.slow
def test_a_1_gib_answer_is_refused_in_bounded_memory(server, args, route, body):
    server.on(route, body)
    code, err, rss, _ = run(*(a.format(url=server.url) for a in args))
    assert code == 1 and "the answer exceeds" in err and "Traceback" not in err, err
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"


@pytest.mark.slow
def test_a_gzip_bomb_as_the_flight_record_is_refused_in_bounded_memory(server, bomb, tmp_path):
    server.on("/api/flight", raw_answer(bomb))
    code, err, rss, _ = run("eplb", "--live", "--url", server.url, "--gpus", "2")
    assert code == 1 and "once decompressed" in err and "Traceback" not in err, err
    assert rss < RSS_LIMIT_MB, f"peak RSS {rss:.0f} MB"
    server.on(f"/api/captures/{ID}/flight", raw_answer(bomb, headers={"Content-Type": "application/json",
                                                                       "Content-Encoding": "gzip"}))
    code, err, rss, _ = run("eplb", "--capture", ID, "--url", server.url, "--gpus", "2")
    assert code == 1 and "once decompressed" in err and rss < RSS_LIMIT_MB, (err, rss)
    path = tmp_path / "flight.json.gz"
    path.write_bytes(bomb)
    code, err, rss, _ = run("eplb", "--flight", str(path), "--gpus", "2")
    assert code == 1 and "once decompressed" in err and rss < RSS_LIMIT_MB, (err, rss)


# -- traces pull: nothing outside --out --------------------------------------------------------------------

@pytest.mark.parametrize("answer, message", [
    (meta("/abs/x"), "not a capture id"),
    (meta("../../x"), "not a capture id"),
    (meta("20250101T000000Z-manual-000000"), "not the capture asked for"),
    (meta(files=[("../evil.sh", 4)]), "not a plain file name"),
    (meta(files=[("/abs/evil.sh", 4)]), "not a plain file name"),
    (meta(files=[(".bashrc", 4)]), "not a plain file name"),
    (meta(files=[("metadata.json", 4)]), "not a plain file name"),
    (meta(files=[("trace.json", -4)]), "size"),
    ({"captures": []}, "not a moe-monitor sidecar"),
], ids=["abs-id", "dotdot-id", "other-id", "dotdot-name", "abs-name", "dot-name", "metadata-name", "negative",
        "not-metadata"])
def test_pull_refuses_ids_and_names_that_leave_out_and_writes_nothing(server, tmp_path, answer, message):
    if answer.get("id") == "/abs/x":
        answer["id"] = str(tmp_path / "abs")
    answer = json.loads(json.dumps(answer).replace("/abs/evil.sh", str(tmp_path / "evil.sh")))
    server.on(f"/api/captures/{ID}", json_answer(answer))
    server.on(".*/files/.*", raw_answer(b"evil"))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("traces", "--url", server.url, "pull", ID, "--out", str(out))
    assert message in one_line_error(result)
    assert tree(tmp_path) == [], tree(tmp_path)
    assert not any("/files/" in p for p in server.seen)  # refused before asking for any file


def test_pull_writes_inside_out_and_follows_no_planted_symlink(server, tmp_path):
    server.on(f"/api/captures/{ID}", json_answer(meta(files=[("trace.json", 4), ("flight.json.gz", 3)])))
    server.on(f"/api/captures/{ID}/files/trace.json", raw_answer(b"good"))
    server.on(f"/api/captures/{ID}/files/flight.json.gz", raw_answer(b"gzz"))
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.write_text("untouched")
    (out / ID).mkdir(parents=True)
    os.symlink(victim, out / ID / "trace.json")
    os.symlink(victim, out / ID / ".trace.json.part")
    result = invoke("traces", "--url", server.url, "pull", ID, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "untouched"
    assert (out / ID / "trace.json").read_bytes() == b"good" and not (out / ID / "trace.json").is_symlink()
    assert tree(out) == [f"{ID}/flight.json.gz", f"{ID}/metadata.json", f"{ID}/trace.json"]
    # the capture's directory itself planted as a link out of --out
    os.rename(out / ID, tmp_path / "moved")
    os.symlink(tmp_path / "elsewhere", out / ID)
    (tmp_path / "elsewhere").mkdir()
    result = invoke("traces", "--url", server.url, "pull", ID, "--out", str(out))
    assert "outside" in one_line_error(result) and os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("answer, message", [
    (raw_answer(b"go"), "2 bytes announced, its metadata declares 4"),
    (stream_answer(b"go"), "cut short at 2 of 4 bytes"),
    (stream_answer(b"go", announce=4), "cut short"),
    (stream_answer(b"goodbye"), "more than the 4 bytes"),
], ids=["announced-short", "chunked-short", "connection-dropped", "chunked-long"])
def test_a_download_shorter_or_longer_than_declared_never_looks_complete(server, tmp_path, answer, message):
    server.on(f"/api/captures/{ID}", json_answer(meta()))
    server.on(f"/api/captures/{ID}/files/trace.json", answer)
    out = tmp_path / "out"
    result = invoke("traces", "--url", server.url, "pull", ID, "--out", str(out))
    assert message in one_line_error(result)
    assert tree(out) == [], tree(out)  # no partial file, no metadata.json claiming a complete capture


# -- what is printed -----------------------------------------------------------------------------------------

def test_server_strings_are_printed_with_their_escape_sequences_visible(server):
    capture = meta(reason=ESCAPES, outcome="ok\x1b[31m", evidence={"signal": "x\x9bq", "note\x07": "\x1b[8m"})
    server.on("/api/captures", json_answer({"captures": [capture]}))
    server.on(f"/api/captures/{ID}", json_answer(capture))
    for args in (["list"], ["show", ID]):
        result = invoke("traces", "--url", server.url, *args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output and "\x9b" not in result.output
        assert "\\x1b[2J\\x1b]0;pwned\\x07" in result.output
    shown = invoke("traces", "--url", server.url, "show", ID, "--json")
    assert "\x1b" not in shown.output and json.loads(shown.output)["reason"] == ESCAPES


def test_server_error_messages_are_printed_with_their_escape_sequences_visible(server):
    server.on("/api/captures", json_answer({"error": "no\x1b]0;pwned\x07"}, status=500))
    line = one_line_error(invoke("traces", "--url", server.url, "list"))
    assert "500" in line and "no\\x1b]0;pwned\\x07" in line


@pytest.mark.parametrize("body, message", [
    (gzip.compress(b'{"format": "moe-monitor-flight/1"}' * 100)[:-40], "truncated"),
    (os.urandom(4096), "not a readable flight record"),
    (b"\x1f\x8b" + os.urandom(4096), "not valid gzip"),
], ids=["truncated-gzip", "random", "random-after-gzip-magic"])
def test_a_broken_flight_record_is_a_one_line_error(server, body, message):
    server.on(f"/api/captures/{ID}", json_answer(meta(files=[("flight.json.gz", len(body))])))
    server.on(f"/api/captures/{ID}/flight", raw_answer(body))
    assert message in one_line_error(invoke("traces", "--url", server.url, "show", ID))
    server.on("/api/flight", raw_answer(body))
    assert message in one_line_error(invoke("eplb", "--live", "--url", server.url, "--gpus", "2"))


@pytest.mark.parametrize("route, answer", [
    ("/api/captures", {"captures": "none"}),
    ("/api/captures", [1, 2]),
    ("/api/captures", {"captures": [{"id": ID}]}),
    ("/api/captures", {"captures": [None]}),
], ids=["not-a-list", "not-an-object", "capture-without-fields", "null-capture"])
def test_list_answers_of_the_wrong_shape_are_one_line_errors(server, route, answer):
    server.on(route, json_answer(answer))
    one_line_error(invoke("traces", "--url", server.url, "list"))


def test_trigger_answer_without_an_id_is_not_a_sidecar(server):
    server.on("/api/captures", json_answer({"ok": True}))
    assert "not a moe-monitor sidecar" in one_line_error(invoke("traces", "--url", server.url, "trigger",
                                                                "--reason", "x"))


# -- eplb: every input path --------------------------------------------------------------------------------

def flight(counts, experts=2, layer_ids=(0,), **window) -> dict:
    return {"format": "moe-monitor-flight/1", "layer_ids": list(layer_ids), "experts": experts,
            "windows": [{"start": 0.0, "end": 1.0, "counts": counts, **window}]}


BAD_FLIGHTS = {
    "null-count": (flight([[None, 1]]), "null, NaN or infinity"),
    "string-count": (flight([["a", 1]]), "not numbers"),
    "nested-count": (flight([[[1], [2]]]), "not numbers"),
    "negative-count": (flight([[-5, 1]]), "negative"),
    "infinite-count": (json.dumps(flight([[1, 1]])).replace("[[1, 1]]", "[[1e999, 1]]"), "out of range"),
    "sum-overflows": (flight([[1.7e308, 1.7e308]]), "too large"),
    "float-experts": (flight([[1, 1]], experts=2.0), "experts"),
    "huge-experts": ({**flight([[1]]), "experts": 10_000_000, "windows": []}, "experts"),
    "negative-layer": (flight([[1, 1]], layer_ids=(-1,)), "layer id -1"),
    "huge-layer": (flight([[1, 1]], layer_ids=(10**9,)), "layer id 1000000000"),
    "string-layer": (flight([[1, 1]], layer_ids=("a",)), "layer id 'a'"),
    "repeated-layer": (flight([[1, 1], [1, 1]], layer_ids=(3, 3)), "increasing"),
    "no-start": ({**flight([[1, 1]]), "windows": [{"counts": [[1, 1]]}]}, "start"),
    "string-start": (flight([[1, 1]], start="x"), "start"),
    "window-not-object": ({**flight([[1, 1]]), "windows": [[1, 1]]}, "window 0"),
    "list": ([1, 2], "not a flight record"),
    "not-json": ("{", "not a readable flight record"),
}


@pytest.mark.parametrize("doc, message", BAD_FLIGHTS.values(), ids=BAD_FLIGHTS.keys())
def test_eplb_flight_file_of_the_wrong_shape_is_a_one_line_error(tmp_path, doc, message):
    path = tmp_path / "flight.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    line = one_line_error(invoke("eplb", "--flight", str(path), "--gpus", "2", "--out", str(tmp_path / "plan")))
    assert message in line and str(path) in line, line


def test_eplb_flight_from_the_sidecar_of_the_wrong_shape_names_it(server):
    server.on(f"/api/captures/{ID}/flight", json_answer(flight([[None, 1]])))
    line = one_line_error(invoke("eplb", "--capture", ID, "--url", server.url, "--gpus", "2"))
    assert "null, NaN or infinity" in line and f"capture {ID}" in line


def prometheus(*cells, status="success") -> dict:
    return {"status": status, "data": {"resultType": "vector", "result": [
        {"metric": {"layer": layer, "expert": expert}, "value": [1.7e9, value]} for layer, expert, value in cells]}}


def model_info(experts: str, layers: str = "1") -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"experts": experts, "moe_layers": layers}, "value": [1.7e9, "1"]}]}}


GOOD = [("0", str(e), "100") for e in range(4)]


def prometheus_server(server, answer, info=None):
    async def handler(request):
        from aiohttp import web
        doc = info if "moe_model_info" in request.query.get("query", "") else answer
        if isinstance(doc, bytes):
            return web.Response(body=doc, content_type="application/json")
        return web.json_response(doc if doc is not None else {"status": "success", "data": {"result": []}})
    server.on("/api/v1/query", handler)


BAD_PROMETHEUS = {
    "expert-minus-1": (prometheus(*GOOD, ("0", "-1", "1000")), model_info("4"), "expert id -1"),
    "expert-10-million": (prometheus(*GOOD, ("0", "10000000", "1000")), model_info("4"), "expert id 10000000"),
    "expert-past-declared": (prometheus(*GOOD, ("0", "4", "1000")), model_info("4"), "expert id 4"),
    "expert-huge-undeclared": (prometheus(*GOOD, ("0", "10000000", "1000")), None, "expert id 10000000"),
    "layer-minus-1": (prometheus(*GOOD, ("-1", "0", "1000")), model_info("4"), "layer id -1"),
    "layer-huge": (prometheus(*GOOD, ("1000000000", "0", "1")), model_info("4"), "layer id 1000000000"),
    "expert-not-number": (prometheus(*GOOD, ("0", "x", "1")), model_info("4"), "expert id 'x'"),
    "label-missing": ({"status": "success", "data": {"result": [{"metric": {"layer": "0"}, "value": [0, "1"]}]}},
                      model_info("4"), "expert"),
    "value-not-number": (prometheus(("0", "0", "lots")), model_info("4"), "value"),
    "value-negative": (prometheus(*GOOD, ("0", "1", "-1e9")), model_info("4"), "negative"),
    "not-an-object": ([1, 2], None, "Prometheus"),
    "no-data": ({"status": "success"}, None, "Prometheus"),
    "result-not-list": ({"status": "success", "data": {"result": "x"}}, None, "Prometheus"),
    "error-with-escapes": ({"status": "error", "error": "bad\x1b]0;pwned\x07"}, None, "bad\\x1b]0;pwned\\x07"),
    "not-json": (b"<html>", None, "did not answer JSON"),
    "two-models": (prometheus(*GOOD), {"status": "success", "data": {"result": [
        {"metric": {"experts": "4"}, "value": [0, "1"]}, {"metric": {"experts": "8"}, "value": [0, "1"]}]}},
        "different expert counts"),
}


@pytest.mark.parametrize("answer, info, message", BAD_PROMETHEUS.values(), ids=BAD_PROMETHEUS.keys())
def test_eplb_prometheus_answers_that_cannot_be_right_are_one_line_errors(server, answer, info, message):
    prometheus_server(server, answer, info)
    start = time.monotonic()
    line = one_line_error(invoke("eplb", "--prometheus", server.url, "--gpus", "2", "--redundant", "0"))
    assert message in line and "\x1b" not in line, line
    assert time.monotonic() - start < 30


def test_eplb_prometheus_sizes_the_history_by_the_declared_model(server):
    prometheus_server(server, prometheus(*GOOD[:2]), model_info("4"))
    result = invoke("eplb", "--prometheus", server.url, "--gpus", "2", "--redundant", "0")
    assert result.exit_code == 0, result.output
    assert "200 assignments over 1 MoE layers x 4 experts" in result.stdout  # experts 2 and 3 got none


@pytest.mark.parametrize("args, message", [
    (["--redundant", "a,b"], "--redundant"),
    (["--redundant", "100000000"], "--redundant"),
    (["--timeout", "0"], "--timeout"),
], ids=["redundant-not-numbers", "redundant-huge", "timeout-zero"])
def test_eplb_bad_options_are_usage_errors(tmp_path, args, message):
    path = tmp_path / "flight.json"
    path.write_text(json.dumps(flight([[1, 3]])))
    result = invoke("eplb", "--flight", str(path), "--gpus", "2", *args)
    assert result.exit_code == 2 and message in result.stderr and result.exception is not None, result.output
    assert isinstance(result.exception, SystemExit)


def test_unreachable_and_invalid_urls_are_one_line_errors(tmp_path):
    for url in ("http://[::1", "ftp://example.invalid", "http://127.0.0.1:9"):
        one_line_error(invoke("traces", "--url", url, "list"))
        one_line_error(invoke("eplb", "--live", "--url", url, "--gpus", "2"))
        one_line_error(invoke("eplb", "--prometheus", url, "--gpus", "2"))


def test_the_clients_id_and_name_formats_are_the_sidecars():
    """The client keeps its own copy of the sidecar's formats (it checks the answer, not the server's code):
    they must stay the same, or pull would refuse real captures (or accept what the sidecar never sends)."""
    from moe_monitor.capture.catalog import ID_RE, NAME_RE, new_capture_id
    from moe_monitor.client.untrusted import CAPTURE_ID_RE, FILE_NAME_RE, capture_id

    assert (CAPTURE_ID_RE.pattern, FILE_NAME_RE.pattern) == (ID_RE.pattern, NAME_RE.pattern)
    assert capture_id(new_capture_id("Imbalance: layer 3!", 1.7e9)) is not None
