"""Hostile or broken trace files (issue #14, defect 3): refused fast, with a TraceError naming the file and the
limit, in bounded memory and CPU; real traces still parse to the same events.

Before the limits: a 115-byte gzip of 20,000 nested arrays took ~970 MB (ijson keeps every open level's path as
a string, so memory grows with the depth squared), a 64 MiB string took 11 s (yajl re-reads a token from its
start at every 64 KiB read: quadratic), a 64 MiB number 144 s.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_monitor.breakdown import trace as trace_module
from moe_monitor.breakdown.trace import TraceError, TraceLimits, read_trace

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "traces")
REAL = sorted(os.path.join(FIXTURES, f) for f in os.listdir(FIXTURES)) + [
    os.path.join(HERE, "..", "benchmarks", "results", f)
    for f in ("vllm026_h200_eager_rank0.pt.trace.json.gz", "vllm026_h200_graphs_rank0.pt.trace.json.gz")
]
KERNEL = {"ph": "X", "cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel<4>", "pid": 0,
          "tid": 7, "ts": 1.5, "dur": 2.25, "args": {"stream": 7, "correlation": 12, "grid": [1, 2, 3]}}
STEP = r"execute_context_\d+\(\d+\)_generation_\d+\(\d+\)"  # vLLM's engine step ranges

# Parses one file in a fresh interpreter (address space capped, so the unguarded parser fails instead of
# taking the machine's memory) and reports time, peak RSS and the outcome.
CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from moe_monitor.breakdown.trace import TraceError, read_trace
start = time.perf_counter()
try:
    read_trace(sys.argv[1])
    outcome = "parsed"
except TraceError as e:
    outcome = str(e)
except MemoryError:
    outcome = "MemoryError"
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child of a big pytest process
# would report its parent's peak (seen in the full suite: 1029 MB for a 5 ms refusal)
with open("/proc/self/status") as f:
    hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - start, "outcome": outcome, "peak_mb": hwm_kb / 1024}))
"""


def parse_in_child(path) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def gzip_bomb(path, head: bytes, body: bytes, tail: bytes):
    path.write_bytes(gzip.compress(head + body + tail, compresslevel=9))
    return path


def nested_bomb(tmp_path, depth=20_000):
    return gzip_bomb(tmp_path / "nested.pt.trace.json.gz", b'{"traceEvents": [', b"[" * depth + b"]" * depth, b"]}")


def wide_event_bomb(tmp_path):
    """One event whose args hold 11M empty arrays: 32 MB of JSON in a 32 kB gzip."""
    return gzip_bomb(tmp_path / "wide.pt.trace.json.gz", b'{"traceEvents": [{"ph": "X", "cat": "kernel", "ts": 1, '
                     b'"dur": 1, "name": "k", "args": [', b"[]," * (11 << 20), b"[]]}]}")


@pytest.mark.parametrize("bomb, limit", [(nested_bomb, "max_depth"), (wide_event_bomb, "max_event_bytes")])
def test_a_small_gzip_bomb_is_refused_fast_in_bounded_memory(tmp_path, bomb, limit):
    path = bomb(tmp_path)
    assert path.stat().st_size < 40_000
    r = parse_in_child(path)
    assert str(path) in r["outcome"] and f"limit {limit}=" in r["outcome"], r
    assert r["peak_mb"] < 200, r  # unguarded: ~970 MB (nested), MemoryError at 3 GiB (wide)
    assert r["seconds"] < 10, r  # guarded: milliseconds


def test_deeper_nesting_outside_trace_events_is_refused_too(tmp_path):
    path = gzip_bomb(tmp_path / "deep.json.gz", b'{"deviceProperties": ', b"[" * 100_000 + b"]" * 100_000,
                     b', "traceEvents": []}')
    r = parse_in_child(path)
    assert "limit max_depth=64" in r["outcome"] and r["peak_mb"] < 200, r  # unguarded: MemoryError


def write_trace(path, events_json: bytes):
    with open(path, "wb") as f:
        f.write(b'{"traceEvents": [')
        f.write(events_json)
        f.write(b"]}")
    return path


@pytest.mark.slow
def test_one_huge_string_costs_linear_time(tmp_path):
    """64 MiB in one name is refused (max_token) in less time than parsing 64 MiB of ordinary events."""
    size = 64 << 20
    one = json.dumps(KERNEL).encode()
    normal = write_trace(tmp_path / "normal.json", b", ".join([one] * (size // (len(one) + 2))))
    huge = write_trace(tmp_path / "huge.json", b'{"ph": "X", "cat": "kernel", "ts": 1, "dur": 2, "name": "'
                       + b"a" * size + b'"}')
    start = time.perf_counter()
    assert len(read_trace(str(normal)).device) > 200_000
    normal_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        read_trace(str(huge))
        outcome = "parsed"
    except TraceError as e:
        outcome = str(e)
    huge_s = time.perf_counter() - start
    assert huge_s < 2 * normal_s + 0.5, (huge_s, normal_s)  # unguarded: ~7x the normal file, and quadratic
    assert re.search(r"huge\.json: refused: a string longer than the limit .*max_token=", outcome), outcome


def test_a_large_process_group_list_is_not_an_event(tmp_path):
    """distributedInfo.pg_config grows with ranks x groups; only what traceEvents holds is an event."""
    groups = [{"pg_name": str(i), "backend_config": "cuda:nccl", "ranks": list(range(1024))} for i in range(500)]
    doc = {"distributedInfo": {"backend": "nccl", "pg_config": groups}, "traceEvents": [KERNEL]}
    path = tmp_path / "ranks.json"
    path.write_bytes(json.dumps(doc).encode())
    assert path.stat().st_size > 2 * TraceLimits().max_event_bytes
    assert len(read_trace(str(path)).device) == 1


def test_one_huge_number_is_refused(tmp_path):
    path = write_trace(tmp_path / "number.json", b'{"ph": "X", "cat": "kernel", "ts": 1, "dur": ' + b"1" * (4 << 20)
                       + b"}")
    with pytest.raises(TraceError, match=r"number\.json: refused: a number longer than the limit .*max_token="):
        read_trace(str(path))


@pytest.mark.parametrize("limits, match", [
    (TraceLimits(max_events=100), "more trace events than the limit .*max_events=100"),
    (TraceLimits(max_bytes=50_000), "more JSON than the limit .*max_bytes=50,000"),
    (TraceLimits(max_name_bytes=2_000), "more distinct event names .*max_name_bytes=2,000"),
    (TraceLimits(max_kept_events=999), r"more events to analyse than the limit \(1,000 .*max_kept_events=999"),
])
def test_count_and_size_limits(tmp_path, limits, match):
    events = [dict(KERNEL, name=f"kernel_{i}", ts=float(i)) for i in range(1000)]
    path = tmp_path / "many.pt.trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    assert len(read_trace(str(path)).device) == 1000  # the defaults take it
    with pytest.raises(TraceError, match=match):
        read_trace(str(path), limits)


def test_a_plain_file_over_max_bytes_is_refused_before_parsing(tmp_path):
    path = write_trace(tmp_path / "big.json", b" " * 10_000)
    with pytest.raises(TraceError, match=r"big\.json: refused: the file is larger than the limit"):
        read_trace(str(path), TraceLimits(max_bytes=5_000))


def test_truncated_gzip_and_invalid_json_still_give_a_trace_error(tmp_path):
    data = open(REAL[0], "rb").read()
    (tmp_path / "cut.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated or corrupt gzip"):
        read_trace(str(tmp_path / "cut.json.gz"))
    (tmp_path / "bad.json").write_bytes(b'{"traceEvents": [{"ph": "X", "cat": "kernel", "name": "\xff"}]}')
    with pytest.raises(TraceError, match=r"bad\.json: not valid JSON or cut short \([^\n]*\)$"):  # one line
        read_trace(str(tmp_path / "bad.json"))
    (tmp_path / "cut.json").write_bytes(json.dumps({"traceEvents": [KERNEL] * 50}).encode()[:-300])
    with pytest.raises(TraceError, match="not valid JSON or cut short"):
        read_trace(str(tmp_path / "cut.json"))


def test_odd_field_types_skip_the_event_instead_of_crashing(tmp_path):
    events = [dict(KERNEL, tid=[1]), dict(KERNEL, cat=["kernel"]), dict(KERNEL, name={"a": 1}), KERNEL]
    path = write_trace(tmp_path / "odd.json", json.dumps(events)[1:-1].encode())
    t = read_trace(str(path))
    assert [e.name for e in t.device] == ["{'a': 1}", KERNEL["name"]]  # unguarded: TypeError on the list tid


def reference_events(path):
    """The events read_trace keeps, from the whole file parsed by the stdlib: what it returned before limits."""
    device, cpu, steps = [], [], []
    for e in json.load(gzip.open(path))["traceEvents"]:
        if e.get("ph") != "X" or "ts" not in e or e.get("cat") == "Trace":  # tid "PyTorch Profiler"
            continue
        ev = (str(e.get("name", "")), float(e["ts"]), float(e.get("dur", 0.0)), int(e.get("tid", 0)), e.get("cat"))
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            device.append(ev)
        elif e.get("cat") == "cpu_op":
            cpu.append(ev)
        elif e.get("cat") in ("user_annotation", "gpu_user_annotation") and re.match(STEP, ev[0]):
            steps.append(ev)
    if device:  # GPU traces: the steps' device projection when there is one
        steps = [s for s in steps if s[4] == "gpu_user_annotation"] or steps
    order = lambda evs: sorted(evs, key=lambda ev: (ev[1], -ev[2]))  # noqa: E731
    return order(device), order(cpu), order(steps)


@pytest.mark.parametrize("path", REAL, ids=os.path.basename)
def test_real_traces_parse_to_the_same_events(path):
    t = read_trace(path)
    device, cpu, steps = reference_events(path)
    as_tuples = lambda evs: [(e.name, e.ts, e.dur, e.stream, e.cat) for e in evs]  # noqa: E731
    assert as_tuples(t.device) == device
    if not device:  # CPU traces keep their ops (and gloo's ranges, not counted here)
        assert [e for e in as_tuples(t.cpu_ops) if e[0].startswith(("aten::", "_C::", "vllm::"))] == \
            [e[:4] + ("cpu_op",) for e in cpu if e[0].startswith(("aten::", "_C::", "vllm::"))]
    assert as_tuples(t.steps) == steps


def test_cli_prints_one_line_and_fails(tmp_path):
    path = nested_bomb(tmp_path)
    cli = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", str(path)], capture_output=True,
                         text=True, timeout=120)
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode != 0 and len(lines) == 1, cli.stderr
    assert str(path) in lines[0] and "nested deeper than the limit" in lines[0] and "max_depth=64" in lines[0]


# The guard is a hand-written lexer: it must agree with a plain one on what breaks a limit, whatever the blocks.
def breaks(doc: bytes, limits: TraceLimits) -> set[str]:
    """The limits a char-by-char JSON lexer says `doc` breaks."""
    out, depth, in_string, escaped, last, event, parent = set(), 0, False, False, -1, -1, 0
    for i, c in enumerate(doc):
        if in_string:
            if escaped or c == 0x5C:
                escaped = not escaped
                continue
            if c != 0x22:
                continue
            in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            out |= {"max_depth"} if depth > limits.max_depth else set()
            parent = c if depth == 2 else parent
            event = (i if parent == 0x5B else -1) if depth == 3 else event  # events: in a top-level array
        elif c in b"]}":
            depth -= 1
            if depth == 2 and event >= 0 and i - event + 1 > limits.max_event_bytes:
                out.add("max_event_bytes")
        elif c != 0x2C:
            continue
        out |= {"max_token"} if i - last - 1 > limits.max_token else set()
        last = i
    return out | ({"max_token"} if len(doc) - 1 - last > limits.max_token else set())


ALPHABET = st.sampled_from(list('ab1 [],{}:"\\é\n'))
SCALARS = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(ALPHABET, max_size=30))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(ALPHABET, max_size=8), inner, max_size=4), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(VALUES, max_size=5), info=st.dictionaries(st.sampled_from(["pg_config", "rank"]), VALUES),
       indent=st.sampled_from([None, 1]), ascii_only=st.booleans(), block=st.integers(1, 70),
       depth=st.integers(2, 10), token=st.integers(2, 90), event=st.integers(4, 500))
@pytest.mark.slow
def test_the_guard_agrees_with_a_plain_lexer(tmp_path, monkeypatch, events, info, indent, ascii_only, block, depth,
                                             token, event):
    """Events are what a top-level array holds: a list under "distributedInfo" ({...}) is not one."""
    doc = json.dumps({"distributedInfo": info, "traceEvents": events}, indent=indent, ensure_ascii=ascii_only).encode()
    limits = TraceLimits(max_depth=depth, max_token=token, max_event_bytes=event)
    monkeypatch.setattr(trace_module, "_BLOCK", block)
    (tmp_path / "t.json").write_bytes(doc)
    try:
        read_trace(str(tmp_path / "t.json"), limits)
        refused = None
    except TraceError as e:
        refused = str(e).split("(limit ")[1].split("=")[0] if ": refused: " in str(e) else None
    expected = breaks(doc, limits)
    assert (refused in expected) if refused else not expected, (refused, expected)


# read_trace decodes the events with msgspec and falls back to ijson (the previous reader, parser="ijson") for a
# batch it cannot type: the two must agree on any document, odd field types and layouts included, except on
# integers outside yajl's range (-2**63, 2**63): yajl refuses the trace ("integer overflow"), msgspec reads them.
FIELD_VALUES = {
    "ph": st.sampled_from(["X", "X", "X", "f", "M", "i"]),
    "cat": st.sampled_from(["kernel", "cpu_op", "gpu_memcpy", "gpu_memset", "gpu_user_annotation", "user_annotation",
                            "cuda_runtime", "ac2g"]),
    "name": st.sampled_from(["k", "aten::mm", "execute_context_1(2)_generation_0(0)", "nccl:all_reduce",
                             "gloo:all_to_all", "é✓"]) | st.text(ALPHABET, max_size=6),
    "ts": st.floats(-1e6, 1e12, allow_nan=False) | st.integers(-10**6, 10**12),
    "dur": st.floats(0, 1e4, allow_nan=False) | st.integers(0, 10**4),
    "tid": st.integers(-2**63 + 1, 2**63 - 1) | st.sampled_from(["PyTorch Profiler", ""]),
}
ODD = SCALARS | st.lists(SCALARS, max_size=2) | st.dictionaries(st.text(ALPHABET, max_size=3), SCALARS, max_size=2) \
    | st.sampled_from([1e308, -0.0, 2**63 - 1, -2**63 + 1, "1.5", "7", True])
EVENT = st.fixed_dictionaries(
    {k: v | ODD if k != "ph" else v for k, v in FIELD_VALUES.items()},
    optional={"args": VALUES, "pid": st.integers(0, 9)}).flatmap(
    lambda e: st.sets(st.sampled_from(sorted(e)), max_size=2).map(lambda drop: {k: e[k] for k in e if k not in drop}))


def members(pairs) -> bytes:
    """A JSON object from (key, JSON text) pairs: keys may repeat."""
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}").encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(EVENT | ODD, max_size=8), more=st.lists(st.tuples(
           st.sampled_from(["traceEvents", "deviceProperties", "distributedInfo", "traceName"]), VALUES), max_size=3),
       as_object=st.integers(0, 15), indent=st.sampled_from([None, 1]), ascii_only=st.booleans(),
       block=st.sampled_from([1, 2, 5, 16, 70, 1 << 20]), max_events=st.integers(1, 12), max_names=st.integers(1, 60),
       in_array=st.integers(0, 15))
@pytest.mark.slow
def test_the_msgspec_and_ijson_readers_agree(tmp_path, monkeypatch, events, more, as_object, indent, ascii_only,
                                             block, max_events, max_names, in_array):
    dump = lambda v: json.dumps(v, indent=indent, ensure_ascii=ascii_only)  # noqa: E731
    trace_events = dump({str(i): e for i, e in enumerate(events)} if as_object == 0 else events)
    doc = members([("traceEvents", trace_events)] + [(k, dump(v)) for k, v in more])  # more may repeat traceEvents
    doc = b"[" + doc + b"]" if in_array == 0 else doc
    try:
        doc.decode()
    except UnicodeDecodeError:
        return
    (tmp_path / "t.json").write_bytes(doc)
    monkeypatch.setattr(trace_module, "_BLOCK", block)
    outcomes = []
    for parser in ("msgspec", "ijson"):
        for limits in (TraceLimits(), TraceLimits(max_events=max_events, max_name_bytes=max_names,
                                                  max_kept_events=max_events // 2)):
            try:
                t = read_trace(str(tmp_path / "t.json"), limits, parser=parser)
                outcomes.append([[(e.name, e.ts, e.dur, e.stream, e.cat) for e in evs]
                                 for evs in (t.device, t.cpu_ops, t.steps, t.annotations)])
            except TraceError as e:  # yajl's context snippet differs: it parsed another piece of the file
                outcomes.append(str(e).split(" (parse error")[0].split(" (lexical error")[0])
    assert outcomes[:2] == outcomes[2:], doc[:2000]


def test_integers_past_64_bits_are_read_where_yajl_refused_the_trace(tmp_path):
    """Valid JSON that yajl cannot represent (it stops at 2**63): the previous reader refused the whole trace;
    msgspec reads it (an unused field here, as a uint64 id in args could be)."""
    path = write_trace(tmp_path / "big_int.json", json.dumps(dict(KERNEL, args={"id": 2**64})).encode())
    assert len(read_trace(str(path)).device) == 1
    with pytest.raises(TraceError, match="integer overflow"):
        read_trace(str(path), parser="ijson")


@pytest.mark.slow
def test_gzip_is_read_as_gzip_file_reads_it(tmp_path):
    """The msgspec path inflates in a thread with zlib (GzipFile's small reads would hand the GIL over at every
    8 KiB): members one after another, zero padding between them; cut short or corrupt, a TraceError."""
    doc = json.dumps({"traceEvents": [dict(KERNEL, ts=float(i)) for i in range(30_000)]}).encode()
    one, half = gzip.compress(doc, mtime=0), len(doc) // 2
    two = gzip.compress(doc[:half], mtime=0) + b"\0" * 9 + gzip.compress(doc[half:], mtime=0) + b"\0" * 3
    cases = {"one": one, "two": two, "empty_member": one + gzip.compress(b"", mtime=0), "cut": one[:-5],
             "garbage": one + b"xy", "crc": one[:-8] + bytes([one[-8] ^ 1]) + one[-7:], "header": one[:12]}
    for name, data in cases.items():
        path = tmp_path / f"{name}.json.gz"
        path.write_bytes(data)
        outcomes = []
        for parser in ("msgspec", "ijson"):
            try:
                outcomes.append(len(read_trace(str(path), parser=parser).device))
            except TraceError as e:
                outcomes.append(str(e).split(" (")[0])
        assert outcomes[0] == outcomes[1], (name, outcomes)
        assert outcomes[0] == (30_000 if name in ("one", "two", "empty_member") else
                               f"{path}: truncated or corrupt gzip"), (name, outcomes)
    assert not [t for t in threading.enumerate() if t.name == "trace-inflate"]  # it ends with the read, refused or not


def test_an_unusual_layout_falls_back_to_the_ijson_reader(tmp_path, monkeypatch):
    """Where the msgspec path's assumptions fail (not seen on valid JSON: the guard cuts every element of a
    top-level array out), read_trace reads the file again with the ijson path instead of failing."""
    path = REAL[0]
    expected = read_trace(path, parser="ijson")

    def unusual(self):
        raise trace_module._Unusual("forced by the test")

    monkeypatch.setattr(trace_module._Document, "close", unusual)
    t = read_trace(path)
    assert [(e.name, e.ts, e.dur) for e in t.cpu_ops] == [(e.name, e.ts, e.dur) for e in expected.cpu_ops]
    assert t.device == expected.device and t.steps == expected.steps
