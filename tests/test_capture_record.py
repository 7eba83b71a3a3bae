"""A capture's metadata read into `CaptureMeta` and written back is the same metadata.json, byte for byte, and the
same /api/captures answers: for captures the capturer stores (traces, a record of one that stored none, an alert
capture) and for metadata.json as earlier versions wrote it. Damaged metadata is refused naming the field."""

from __future__ import annotations

import json
import os
import time

import pytest
from test_capture import FakeProfiler, capturer

from moe_monitor.capture.catalog import METADATA, Catalog
from moe_monitor.schema.capture_record import CaptureMeta, CaptureMetaError

OLD = {"created": 1763899200.5, "reason": "manual", "id": "20251123T120000Z-manual-abcdef", "total_bytes": 4,
       "files": [{"name": "dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz", "bytes": 4}]}  # no outcome, evidence...


def round_trips(catalog: Catalog) -> list[CaptureMeta]:
    metas = []
    for capture_id in sorted(os.listdir(catalog.root)):
        with open(os.path.join(catalog.root, capture_id, METADATA), "rb") as f:
            stored = f.read()
        meta = CaptureMeta.from_json(json.loads(stored))
        assert json.dumps(meta.to_json(), indent=1).encode() == stored, capture_id
        assert catalog.get(capture_id) == json.loads(stored)  # /api/captures/{id}
        metas.append(meta)
    assert catalog.list() == [json.loads(json.dumps(m.to_json())) for m in reversed(metas)]  # /api/captures
    return metas


@pytest.mark.slow
def test_the_metadata_the_capturer_stores_round_trips_byte_for_byte(tmp_path):
    with FakeProfiler(str(tmp_path / "profiles")) as vllm:
        os.makedirs(vllm.profile_dir, exist_ok=True)
        c, _ = capturer(tmp_path, vllm.url)
        context = {"window": {"worst_layer": 3, "ratio": 2.5}, "alert_keys": [["aa", "2026-12-07T03:00:00Z"]]}
        assert c.run("20261123T120000Z-alert-abcdef", "alert", {"alertname": "MoeHotExpert"}, context) == "ok"
        assert c.run("20261123T120100Z-imbalance-abcdef", "imbalance", {"signal": "worst", "current": 6.0},
                     {}) == "ok"
    dead, _ = capturer(tmp_path, "http://127.0.0.1:9", timeout_s=2)
    assert dead.run("20261123T120200Z-manual-abcdef", "manual", {}, {}) == "start_failed"
    old = os.path.join(c.catalog.root, OLD["id"])
    os.mkdir(old)
    with open(os.path.join(old, OLD["files"][0]["name"]), "wb") as f:
        f.write(b"old!")
    with open(os.path.join(old, METADATA), "w") as f:
        f.write(json.dumps(OLD, indent=1))

    metas = {m.id: m for m in round_trips(Catalog(c.catalog.root))}
    alert, detector = metas["20261123T120000Z-alert-abcdef"], metas["20261123T120100Z-imbalance-abcdef"]
    record, earlier = metas["20261123T120200Z-manual-abcdef"], metas[OLD["id"]]
    assert alert.alert_keys == (("aa", "2026-12-07T03:00:00Z"),) and alert.evidence["alertname"] == "MoeHotExpert"
    assert detector.outcome == "ok" and detector.breakdown and detector.breakdown["experts"] > 0.3
    assert "breakdown.json" in detector.file_names and detector.total_bytes == sum(f.bytes for f in detector.files)
    assert detector.duration_s is not None and detector.error is None and detector.stored_traces
    assert record.files == () and record.outcome == "start_failed" and record.error
    assert (earlier.outcome, earlier.error, earlier.evidence, earlier.breakdown, earlier.duration_s,
            earlier.alert_keys) == ("", None, {}, None, None, ())


GOOD = {"id": "20261123T120000Z-manual-abcdef", "created": 1.5, "total_bytes": 4, "files": [{"name": "t", "bytes": 4}]}


@pytest.mark.parametrize("change, message", [
    ({"id": "../x"}, "id '../x' is not a capture id"),
    ({"created": "now"}, "created 'now' is not a number"),
    ({"created": float("nan")}, "created nan is not a number"),
    ({"total_bytes": True}, "total_bytes True is not a number"),
    ({"files": {}}, "files is not a list"),
    ({"files": [{"name": "../t", "bytes": 1}]}, "files: '../t' is not a plain file name"),
    ({"files": [{"name": "t", "bytes": -1}]}, "files: file t: size -1 is not a number of bytes"),
    ({"files": [{"name": "t", "bytes": 1}] * 2}, "files: file t is listed twice"),
    ({"reason": 3}, "reason 3 is not a string"),
    ({"outcome": ["ok"]}, "outcome ['ok'] is not a string"),
    ({"error": 1}, "error 1 is not a string"),
    ({"evidence": []}, "evidence [] is not an object"),
    ({"duration_s": "1"}, "duration_s '1' is not a number"),
    ({"breakdown": {"experts": "a"}}, "breakdown is not an object of shares"),
    ({"alert_keys": [["aa"]]}, "alert_keys is not a list of [fingerprint, startsAt]"),
], ids=lambda x: next(iter(x)) if isinstance(x, dict) else None)
def test_damaged_metadata_is_refused_naming_the_field(tmp_path, change, message):
    with pytest.raises(CaptureMetaError) as e:
        CaptureMeta.from_json({**GOOD, **change})
    assert message in str(e.value)
    capture_dir = tmp_path / GOOD["id"]
    capture_dir.mkdir()
    (capture_dir / METADATA).write_text(json.dumps({**GOOD, **change}))
    catalog = Catalog(str(tmp_path))
    stored_as = "names another id ('../x')" if "id" in change else message  # in another capture's directory
    assert catalog.list() == [] and stored_as in catalog.damaged[GOOD["id"]]


def test_missing_fields_and_other_documents_are_refused():
    for doc, message in [([], "a list, not an object"), ({"id": GOOD["id"]}, "no created, files, total_bytes")]:
        with pytest.raises(CaptureMetaError) as e:
            CaptureMeta.from_json(doc)
        assert message in str(e.value)


def test_store_refuses_metadata_it_could_not_read_back(tmp_path):
    catalog = Catalog(str(tmp_path))
    with pytest.raises(CaptureMetaError, match="reason 1 is not a string"):
        catalog.store(GOOD["id"], [], {"created": time.time(), "reason": 1})
    assert os.listdir(tmp_path) == []
