"""The quality benchmark's harness on a config-built tiny BERT: it runs, records, resumes and reports.

Checks the plumbing only (every method trains through the one loop, a rerun skips finished runs, the
report counts the grid), not accuracy.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

pytest.importorskip("matplotlib")

from benchmarks.quality import harness, run, workloads  # noqa: E402
from benchmarks.quality.harness import RunSpec, train_and_evaluate  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return workloads.build_tiny(train_examples=32, test_examples=16)


@pytest.mark.parametrize("method", ["full", "lora", "loraplus", "adalora", "gora"])
def test_one_run_records_what_the_report_needs(tiny, method, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    spec = RunSpec("tiny", method, 1e-3, 0, n_calib=2)
    record = train_and_evaluate(tiny, spec)
    assert record["run_id"] == spec.run_id
    assert record["steps"] == tiny.steps == 4
    assert len(record["train_loss"]) == 4
    assert 0.0 <= record["accuracy"] <= 1.0 and record["examples"] == 16
    assert record["collapsed"] == (record["majority_share"] >= harness.COLLAPSE_SHARE)
    assert record["trainable_params"] > 0
    json.dumps(record)  # a run file must be plain JSON


def test_gora_keeps_the_lora_budget_and_uses_the_ratio(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    lora = train_and_evaluate(tiny, RunSpec("tiny", "lora", 1e-3, 0))
    gora = train_and_evaluate(tiny, RunSpec("tiny", "gora", 1e-3, 0, ratio=4.0, n_calib=2))
    info = gora["method_info"]
    assert info["allocated"] <= info["budget"]
    assert gora["trainable_params"] <= lora["trainable_params"]
    assert gora["label"] == "gora-x4-n2"
    # the plan is cached: a second lr of the same seed reuses it
    again = train_and_evaluate(tiny, RunSpec("tiny", "gora", 3e-3, 0, ratio=4.0, n_calib=2))
    assert again["method_info"]["plan_cached"] is True


def test_grid_resumes_and_reports(tiny, tmp_path):
    templates = [RunSpec("nlu", "lora", 0, 0), RunSpec("nlu", "gora", 0, 0, ratio=1.0, n_calib=2)]
    mode = replace(
        run.MODES["quick"], name="test", results=tmp_path, lrs=[1e-3], seeds=[0], nlu_methods=templates,
        nlg_methods=[], nlg_seeds=[], ablation_seeds=[0], ablations={"B/A lr ratio": [dict(ratio=1.0), dict(ratio=4.0)]},
        builders={"nlu": lambda: tiny}, probes=[("tiny", "nlu", 2, 2, False)],
    )
    run.run_grid(mode, ["pytest"], None, {"nlu", "nlg", "ablation", "probe"})
    files = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert files == ["nlu-gora-x1-n2-lr0.001-s0.json", "nlu-gora-x4-n2-lr0.001-s0.json", "nlu-lora-lr0.001-s0.json"]
    stamps = [json.loads((tmp_path / "runs" / f).read_text())["stamp"] for f in files]
    assert all(s["command"] == "pytest" and s["versions"]["torch"] for s in stamps)

    before = {f: (tmp_path / "runs" / f).stat().st_mtime_ns for f in files}
    run.run_grid(mode, ["pytest"], None, {"nlu", "nlg", "ablation"})  # nothing left: nothing reruns
    assert before == {f: (tmp_path / "runs" / f).stat().st_mtime_ns for f in files}

    from benchmarks.quality.report import write_report

    path = write_report(mode, run.stamp(["pytest"]))
    text = path.read_text()
    assert "Grid coverage: 3 of 3 planned runs done" in text
    assert (tmp_path / "nlu_accuracy_vs_lr.png").is_file()
    assert (tmp_path / "ablation_base.json").is_file()
    assert (tmp_path / "probes" / "tiny.json").is_file() and "Step-size probe" in text


def test_step_size_probe_scales_the_initial_adapter(tiny):
    from benchmarks.quality.probe import GAMMAS, step_size_probe

    record = step_size_probe(tiny, "tiny", n_calib=2, n_held=2)
    assert [r["gamma"] for r in record["rows"]] == GAMMAS
    losses = [r["calib_loss"] for r in record["rows"]]
    # a small step along -G lowers the loss on the batches G came from (GORA.md: a descent step)
    assert losses[1] < losses[0]
    assert record["best_gamma_held_out"] in GAMMAS


def test_gora_step_size_auto_scores_on_batches_after_the_calibration_ones(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    small = replace(tiny, calib_batch_size=4)  # N + K = 2 + 4 batches of 4 out of 32 examples
    record = train_and_evaluate(small, RunSpec("tiny", "gora", 1e-3, 0, n_calib=2, gamma="auto"))
    info = record["method_info"]
    assert record["label"] == "gora-x16-gauto-n2"
    search = info["step_size_search"]
    assert search["held_out_batches"] == harness.HELD_OUT_STEPS
    assert info["step_size"] == search["chosen"] and f"{search['chosen']:g}" in search["losses"]
    assert info["calib_batches"] == 2
