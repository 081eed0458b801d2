"""The benchmark runner itself, on tiny shapes: every implementation gets a finite row; no timing is asserted."""

import json
import math

import torch

from nanfuse.__main__ import main
from nanfuse.benchmark import cases, overhead, run


def test_runner_writes_every_implementation(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead, "CALLS", 3)
    results = run(out_dir=tmp_path, cases=cases.tiny_cases(torch.device("cpu")), device="cpu", progress=False,
                  echo=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    by_op = {}
    for row in saved["rows"]:
        assert "error" not in row, row
        for field in ("median_ms", "gbs", "fraction_of_copy"):
            assert math.isfinite(row[field]) and row[field] > 0, (field, row)
        assert row["peak_extra_bytes"] is None or row["peak_extra_bytes"] >= 0
        by_op.setdefault(row["op"], set()).add(row["implementation"])
    expected = {op: {"nanfuse", "torch eager"} for op in ("cross_entropy", "softmax", "clip")}
    expected["linear_ce"] = {"nanfuse", "F.linear_cross_entropy", "F.linear_cross_entropy chunked"}
    assert by_op == expected
    assert (tmp_path / "results.md").read_text().count("| nanfuse |") == 4
    ops = [row["op"].split()[0].rstrip(",") for row in saved["overhead"]]
    assert ops == ["cross_entropy", "softmax", "clip_grad_norm_", "NanGuard.step", "training"]
    for row in saved["overhead"]:
        assert all(row[field] > 0 for field in ("eager_us", "registered_us", "torch_us")), row
    assert "eager per-call cost" in (tmp_path / "results.md").read_text()
    assert saved["copy_gbs"] > 0 and saved["device"]


def test_quick_set_has_no_cold_compile():
    assert not any(case.compile_ok for case in cases.quick_cases(torch.device("cpu")))


def test_command_line_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(overhead, "CALLS", 3)
    monkeypatch.setattr(cases, "quick_cases", cases.tiny_cases)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert (tmp_path / "results.json").exists()
