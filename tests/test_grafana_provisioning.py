"""Grafana provisioning of the generated dashboards: the kustomizations that make them ConfigMaps for the Grafana
dashboard sidecar (grafana/kustomization.yaml, deploy/kubernetes/grafana-dashboards/), built with kustomize
(`kustomize build`, or the one inside kubectl; skipped when neither is installed), and the file-provisioning provider
for a plain Grafana (grafana/provisioning/dashboards/moe-monitor.yaml)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DEPLOYABLE = ROOT / "deploy" / "kubernetes" / "grafana-dashboards"
PROVIDER = GRAFANA / "provisioning" / "dashboards" / "moe-monitor.yaml"
# `kubectl apply` (client side) records the whole object in an annotation of at most 256 KiB.
APPLY_LIMIT = 262144
# The fields of a Grafana dashboard provider (Grafana's provisioning docs, "Dashboards").
PROVIDER_FIELDS = {"name", "orgId", "folder", "folderUid", "type", "disableDeletion", "updateIntervalSeconds",
                   "allowUiUpdates", "options"}


def kustomize_build(path: Path) -> list[dict]:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_kustomization_makes_every_dashboard_a_configmap():
    k = yaml.safe_load((GRAFANA / "kustomization.yaml").read_text())
    files = [f for g in k["configMapGenerator"] for f in g["files"]]
    assert sorted(files) == [f"dashboards/{p.name}" for p in DASHBOARDS], "one ConfigMap per dashboard, every one"
    assert k["generatorOptions"]["labels"]["grafana_dashboard"] == "1"
    assert k["generatorOptions"]["disableNameSuffixHash"] is True


@pytest.mark.slow
@pytest.mark.parametrize("path,namespace", [(DEPLOYABLE, "monitoring"), (GRAFANA, None)],
                         ids=["deploy/kubernetes/grafana-dashboards", "grafana"])
def test_kustomize_builds_labelled_configmaps_holding_the_committed_dashboards(path, namespace):
    docs = kustomize_build(path)
    assert {d["kind"] for d in docs} == {"ConfigMap"} and len(docs) == len(DASHBOARDS)
    held = {}
    for cm in docs:
        kubernetes_validate.validate(cm, "1.29.0", strict=True)
        meta = cm["metadata"]
        assert meta["labels"]["grafana_dashboard"] == "1" and meta.get("namespace") == namespace
        assert re.fullmatch(r"moe-monitor-dashboard-[a-z-]+", meta["name"]), meta["name"]  # no hash suffix
        assert len(json.dumps(cm)) < APPLY_LIMIT, f"{meta['name']}: too big for `kubectl apply`"
        (name, text), = cm["data"].items()
        held[name] = text
    assert held == {p.name: p.read_text() for p in DASHBOARDS}
    uids = {json.loads(text)["uid"] for text in held.values()}
    assert len(uids) == len(DASHBOARDS)


def test_the_file_provider_loads_the_dashboards_folder():
    doc = yaml.safe_load(PROVIDER.read_text())
    assert doc["apiVersion"] == 1 and len(doc["providers"]) == 1
    provider = doc["providers"][0]
    assert set(provider) <= PROVIDER_FIELDS, set(provider) - PROVIDER_FIELDS
    assert provider["type"] == "file" and set(provider["options"]) <= {"path", "foldersFromFilesStructure"}
    assert Path(provider["options"]["path"]).is_absolute()
    readme = (GRAFANA / "README.md").read_text()
    assert "provisioning/dashboards/moe-monitor.yaml" in readme and provider["options"]["path"] in readme
    assert "kubectl apply -k deploy/kubernetes/grafana-dashboards" in readme
