"""`pip install moe-monitor` (no extras) is what the sidecar needs: the sidecar, `analyze` and `traces` run
without PyYAML, grafana-foundation-sdk, torch, vLLM or transformers; `mixin` says which extra it needs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EXTRAS_ONLY = ("yaml", "grafana_foundation_sdk", "torch", "vllm", "transformers", "hta", "pandas", "triton")

BLOCK = textwrap.dedent(f"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {EXTRAS_ONLY!r}:
                raise ImportError(f"{{name}} is not installed (blocked by the test)")
    sys.meta_path.insert(0, Block())
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_the_sidecar_and_analyze_run_without_the_extras(tmp_path):
    result = run(f"""
        import json, shutil
        from moe_monitor.sidecar.config import SidecarConfig
        from moe_monitor.sidecar.wiring import build
        from moe_monitor.sidecar import server  # the HTTP edge imports too
        exporter = build(SidecarConfig(segment_dir={os.path.join(FIXTURES, "segments", "t1")!r}),
                         process_metrics=False)
        body = exporter.tick().body.decode()
        assert "moe_model_info" in body and "moe_monitor_collector_success" in body
        from moe_monitor.breakdown.analyze import analyze
        from moe_monitor.breakdown.trace import read_trace
        r = analyze([read_trace({os.path.join(FIXTURES, "traces", "gpu_graph.pt.trace.json.gz")!r})])
        assert r.categories
        from moe_monitor.cli import main
        for args in (["serve", "--help"], ["analyze", "--help"], ["traces", "--help"]):
            try:
                main(args)
            except SystemExit as e:
                assert e.code == 0, args
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_mixin_without_its_extra_names_it():
    result = run("""
        from moe_monitor.cli import main
        main(["mixin", "check", "--out", "."])
    """)
    assert result.returncode == 1, (result.stdout, result.stderr[-2000:])
    assert "pip install 'moe-monitor[mixin]'" in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_demo_and_gen_model_without_vllm_say_in_one_line_what_they_miss():
    for args, says in ((["demo", "--exit"], "moe-monitor demo needs vLLM"),
                       (["demo", "--exit", "--no-alerting"], "moe-monitor demo needs vLLM"),
                       (["gen-model", "/nonexistent/model"], "gen-model needs torch and transformers")):
        result = run(f"""
            from moe_monitor.cli import main
            main({args!r})
        """)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.startswith(f"Error: {says}") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "PyYAML (the 'mixin' extra" not in run("""
        from moe_monitor.cli import main
        main(["demo", "--exit", "--no-alerting"])
    """).stderr, "without alerting the demo does not need PyYAML"


def test_an_otlp_endpoint_without_the_otel_extra_is_logged_with_the_extra_and_spans_are_dropped():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import importlib.abc, logging, os, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("opentelemetry.exporter"):
                    raise ImportError(f"{name} is not installed (blocked by the test)")
        sys.meta_path.insert(0, Block())
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
        from moe_monitor.capture import telemetry
        for n in range(2):
            with telemetry.capture_span(f"c{n}", "manual", {"ratio": 2.5}) as span:
                assert span.is_recording()
        print("OK")
    """)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR moe_monitor.capture.telemetry")]
    assert len(errors) == 1 and "OTEL_EXPORTER_OTLP_ENDPOINT is set" in errors[0] and "'otel' extra" in errors[0], \
        result.stderr
