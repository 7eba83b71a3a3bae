"""`pip install moe-monitor` (no extras) is what the sidecar needs: the sidecar, `analyze` and `traces` run
without PyYAML, grafana-foundation-sdk, torch, vLLM or transformers; `mixin` says which extra it needs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
        from moe_monitor.sidecar.exporter import Exporter
        from moe_monitor.sidecar import server  # the HTTP edge imports too
        exporter = Exporter(SidecarConfig(segment_dir={os.path.join(FIXTURES, "segments", "t1")!r}),
                            process_metrics=False)
        body = exporter.tick().body.decode()
        assert "moe_model_info" in body and "moe_monitor_collector_success" in body
        from moe_monitor.breakdown.analyze import analyze
        from moe_monitor.breakdown.trace import read_trace
        r = analyze([read_trace({os.path.join(FIXTURES, "traces", "gpu_graph.pt.trace.json.gz")!r})])
        assert r["categories"]
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
