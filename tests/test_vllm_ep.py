"""EP-rank load under vLLM's EPLB against vLLM's own physical expert load (issue #16 part 1).

The measurement runs on two GPUs (`benchmarks/vllm_ep.py`, device kind nvidia-h200-x2); its data is committed in
benchmarks/results/vllm_ep_h200/. Here: the committed run's figures (always), a fresh run's when `VLLM_EP_RUN`
names its unpacked config directory (`<out>/<config>` of vllm_ep.py), or, on a machine with two GPUs, one run made
now (marker `gpu`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from ep_compare import figures  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "vllm_ep_h200", "run6_dp2ep_eplb")


def check(run: str) -> None:
    ours, truth, even, _ = figures(run)
    total = truth.sum(axis=1)
    assert (ours.sum(axis=1) == total).all(), "every assignment vLLM routed, on some EP rank"
    assert np.abs(ours - even).max() <= 0.001 * total.min(), "the plugin attributes each placement's tokens"
    assert np.abs(ours - truth).max() <= 0.02 * total.min(), "within 2 % of vLLM's own physical load"
    imbalance = lambda a: a.max(axis=1) / a.mean(axis=1)  # noqa: E731
    assert np.abs(imbalance(ours) - imbalance(truth)).max() < 0.03


def test_the_committed_two_gpu_run_matches_vllms_own_eplb_load():
    check(COMMITTED)


@pytest.mark.skipif(not os.environ.get("VLLM_EP_RUN"), reason="VLLM_EP_RUN names no run directory")
def test_a_given_run_matches_vllms_own_eplb_load():
    check(os.environ["VLLM_EP_RUN"])


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs two GPUs and the GPU bundle (docs/install.md, GPU tests)")
def test_a_run_made_now_matches_vllms_own_eplb_load(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vllm_ep.py"), "--out", str(tmp_path),
                    "--configs", "dp2ep_eplb"], check=True, timeout=550)
    with tarfile.open(tmp_path / "dp2ep_eplb.tar.gz") as tar:
        tar.extractall(tmp_path / "run", filter="data")
    check(str(tmp_path / "run" / "dp2ep_eplb"))
