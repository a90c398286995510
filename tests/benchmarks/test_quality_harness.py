"""The quality benchmark on a config-built tiny BERT: every method trains through the one loop, auto
picks its lr from training batches and keeps the evidence, the grid resumes, the report counts it,
and the modules import one way.

Plumbing only, not accuracy: the tiny workload trains in milliseconds.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.quality import harness
from benchmarks.quality.grid import AUTO, MODES, Method, RunSpec, lattice, planned
from benchmarks.quality.harness import train_and_evaluate
from tests.benchmarks.tiny_workload import build_tiny

QUALITY = Path(__file__).resolve().parents[2] / "benchmarks" / "quality"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(train_examples=64, test_examples=16)


@pytest.mark.parametrize("method", ["full", "lora", "loraplus", "gora"])
def test_one_run_records_what_the_report_needs(tiny, method, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    spec = RunSpec("nlu", method, 1e-3, 0, n_calib=2)
    record = train_and_evaluate(tiny, spec)
    assert record["run_id"] == spec.run_id and record["lr_used"] == 1e-3
    assert record["steps"] == tiny.steps == 8 and len(record["train_loss"]) == 8
    assert 0.0 <= record["accuracy"] <= 1.0 and record["examples"] == 16
    assert record["collapsed"] == (record["majority_share"] >= harness.COLLAPSE_SHARE)
    assert record["trainable_params"] > 0 and record["lr_search"] is None
    json.dumps(record)  # a run file must be plain JSON


def test_auto_chooses_from_training_batches_and_keeps_every_candidate(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    longer = build_tiny(train_examples=1000, test_examples=16)  # 125 steps: room for 3 probe steps per candidate
    record = train_and_evaluate(longer, RunSpec("nlu", "gora", AUTO, 0, n_calib=2))
    search = record["lr_search"]
    assert record["run_id"] == "nlu-gora-x16-n2-lrauto-s0"
    assert record["lr_used"] == search["chosen"] in [c["lr"] for c in search["candidates"]]
    # every candidate lies on the grid's quarter-decade lattice, so auto's pick is also a grid cell
    lattice_points = set(lattice(-28, 28))
    assert all(c["lr"] in lattice_points for c in search["candidates"])
    # the benchmark runs gorafit's own search: short runs from settled moments, sized on the run's steps
    assert search["extra"]["settle_steps"] == search["steps_per_candidate"] >= 1
    assert search["extra"]["train_steps"] == longer.steps and search["extra"]["share_budget"] == 0.10
    assert record["auto_cpu_s"] > 0 and record["cpu_s"] >= record["auto_cpu_s"] + record["train_cpu_s"] - 0.01
    assert record["auto_share"] == pytest.approx(record["auto_cpu_s"] / record["train_cpu_s"], rel=1e-2)


def test_the_grid_resumes_and_the_report_counts_it(tiny, tmp_path):
    from benchmarks.common import stamp
    from benchmarks.quality.executor import run_grid
    from benchmarks.quality.report import write_report

    methods = [Method("lora", "LoRA", RunSpec("nlu", "lora", 0.0, 0), [1e-3, 1.78e-3]),
               Method("gora-x1-n2", "GoRA x1", RunSpec("nlu", "gora", 0.0, 0, ratio=1.0, n_calib=2), [1e-3])]
    mode = replace(MODES["quick"], name="test", results=tmp_path, nlu_seeds=[0], nlg_seeds=[], nlu_methods=methods,
                   nlg_methods=[], lr_points=None, builders={"nlu": lambda: tiny})
    assert len(planned(mode)) == 5  # 2 auto + 3 grid cells
    run_grid(mode, ["pytest"], parts={"grid", "curvature"}, say=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert files == ["nlu-gora-x1-n2-lr0.001-s0.json", "nlu-lora-lr0.001-s0.json", "nlu-lora-lr0.00178-s0.json"]
    assert all(json.loads((tmp_path / "runs" / f).read_text())["stamp"]["command"] == "pytest" for f in files)
    curvature = json.loads((tmp_path / "curvature" / "nlu-lora-s0.json").read_text())
    assert curvature["lambda_max"] > 0 and curvature["iterations"] >= 2

    before = {f: (tmp_path / "runs" / f).stat().st_mtime_ns for f in files}
    run_grid(mode, ["pytest"], parts={"grid"}, say=lambda m: None)  # nothing left: nothing reruns
    assert before == {f: (tmp_path / "runs" / f).stat().st_mtime_ns for f in files}

    text = write_report(mode, stamp(["pytest"])).read_text()
    assert "Coverage: 3 of 5 planned runs done" in text
    assert "| nlu | LoRA | 0 of 1 | 2 of 2 |" in text
    assert (tmp_path / "nlu_accuracy_vs_lr.png").is_file()


def test_the_quality_modules_import_one_way_and_never_the_cli_or_the_tests():
    edges = {}
    for path in QUALITY.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        edges[path.stem] = {n.rsplit(".", 1)[-1] for n in names if n.startswith("benchmarks.quality")}
        assert not any(n.startswith("tests") for n in names), path.name
    assert not any("run" in deps for deps in edges.values())  # run.py is the command line only

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, (*seen, d))) for d in edges.get(a, ()))

    assert not [m for m in edges if reaches(m, m)]  # no import circle


def test_gorafit_defaults_arm_follows_goraplans_default_rank():
    from benchmarks.quality.grid import _gorafit_defaults
    from goraplan.settings import PlanSettings

    defaults = [m for m in MODES["full"].nlu_methods if _gorafit_defaults(m)]
    assert len(defaults) == 1
    assert defaults[0].template.max_rank == PlanSettings(rank=8).resolved().max_rank


def test_the_full_grid_meets_the_issue():
    mode = MODES["full"]
    assert len(mode.nlu_methods) == len(mode.nlg_methods) == 9  # the issue's 8 and GoRA at the paper's r_max
    names = {m.template.method for m in mode.nlu_methods}
    assert names == {"full", "lora", "rslora", "loraplus", "pissa", "loraga", "gora"}
    assert len(mode.nlu_seeds) >= 3 and len(mode.nlg_seeds) >= 2
    for m in mode.nlu_methods + mode.nlg_methods:
        assert m.lrs[-1] / m.lrs[0] >= 99  # two decades
        assert all(b / a <= 2 for a, b in zip(m.lrs, m.lrs[1:]))  # spaced at most 2x
    assert mode.nlu["train_examples"] >= 3000 and mode.nlu["train_examples"] / 32 >= 90
    assert mode.nlg["test_examples"] >= 500 and mode.nlg["train_examples"] / 8 >= 200


def test_arithmetic_test_problems_stay_out_of_training():
    from benchmarks.quality.workloads import arithmetic_problems

    test = arithmetic_problems(300, seed=1)
    train = arithmetic_problems(900, seed=0, exclude={p["prompt"] for p in test})
    assert len({p["prompt"] for p in train}) == 900 and not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    for p in train[:30]:
        a, op, b = p["prompt"].removeprefix("Q: What is ").removesuffix("?\nA:").split()
        assert p["answer"] == {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[op]
        assert p["completion"] == f" {p['answer']}"


def test_a_compressed_arm_scores_the_adapter_that_export_writes(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    spec = RunSpec("nlu", "gora", 1e-2, 0, n_calib=2, compress_to=4)
    assert spec.run_id == "nlu-gora-x16-n2-c4-lr0.01-s0"
    compressed = train_and_evaluate(tiny, spec)
    plain = train_and_evaluate(tiny, replace(spec, compress_to=None))
    info = compressed["compression"]
    assert info["uncompressed"]["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)  # the same training
    assert info["served_max_rank"] == 4 and 0 < info["report"]["norm_kept_total"] < 1
    assert compressed["eval_loss"] != pytest.approx(plain["eval_loss"], rel=1e-6)  # the served adapter is another
    # compressing to the adapter's own largest rank changes nothing: PEFT loads the export to the same scores
    top = plain["method_info"]["rank_max"]
    same = train_and_evaluate(tiny, replace(spec, compress_to=top))
    assert same["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert same["compression"]["served_max_rank"] == top


def test_the_serving_arms_share_runs_with_the_grid():
    from benchmarks.quality.executor import todo
    from benchmarks.quality.grid import serving_planned

    mode = MODES["full"]
    runs = serving_planned(mode)
    labels = {s.label for _, s in runs}
    assert labels == {"lora", "gora-x16-bmax0.003", "gora-x16-r4-16-bmax0.003", "gora-x16-r4-8-bmax0.003",
                      "gora-x16-bmax0.003-c16"}
    assert len([s for _, s in runs if s.workload == "nlu"]) == 5 * (3 + len(mode.nlu_seeds) - 1)
    later = serving_planned(mode, {"lora": 3.16e-3})  # the first seed's best lr carries to the other seeds
    assert {s.lr for _, s in later if s.label == "lora" and s.seed > 0 and s.workload == "nlu"} == {3.16e-3}
    assert {s.lr for _, s in runs if s.workload == "nlg"} == {AUTO}
    ids = [s.run_id for _, s in todo(mode, parts={"auto", "grid", "serving"})]
    assert len(ids) == len(set(ids))  # a serving run that is also a grid cell is listed once


def test_the_serving_arms_run_and_the_report_sets_quality_beside_serving_cost(tiny, tmp_path):
    from benchmarks.common import stamp
    from benchmarks.quality.executor import run_grid
    from benchmarks.quality.report import write_report

    arms = [Method("lora", "LoRA r=8 (serves at 8)", RunSpec("nlu", "lora", 0.0, 0), [1e-3, 1.78e-3]),
            Method("gora-x16-n2-c4", "GoRA compressed to 4", RunSpec("nlu", "gora", 0.0, 0, n_calib=2, compress_to=4),
                   [1e-3, 1.78e-3])]
    mode = replace(MODES["quick"], name="test", results=tmp_path, nlu_seeds=[0, 1], nlg_seeds=[], nlu_methods=[],
                   nlg_methods=[], serving_nlu=arms, builders={"nlu": lambda: tiny})
    run_grid(mode, ["pytest"], parts={"serving"}, say=lambda m: None)
    files = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert len(files) == 2 * 2 + 2  # seed 0: both lrs of each arm; seed 1: each arm at its seed-0 best
    text = write_report(mode, stamp(["pytest"])).read_text()
    assert "## Quality vs serving cost" in text
    row = next(line for line in text.splitlines() if line.startswith("| GoRA compressed to 4 |"))
    assert "(n=2)" in row and row.endswith("| 3 of 3 |")  # seed 0 at 2 lrs, seed 1 at the better one


def test_head_ablation_trains_a_new_head_at_lora_bs_capped_lr_and_nothing_else_moves(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    lrs = {}
    for head_lr in (None, "b"):
        spec = RunSpec("nlu", "gora", 3.16e-4, 0, n_calib=2, b_lr_max=3e-3, max_rank=16, head_lr=head_lr)
        setup, _, _ = harness.prepare(tiny, spec)
        names = {id(p): n for n, p in setup.model.named_parameters()}
        lrs[spec.label] = {names[id(p)]: g["lr"] for g in setup.make_optimizer(3.16e-4).param_groups for p in g["params"]}
    plain, ablated = lrs["gora-x16-r4-16-n2-bmax0.003"], lrs["gora-x16-r4-16-n2-bmax0.003-headb"]
    assert plain.keys() == ablated.keys()
    heads = [n for n in plain if "classifier" in n]
    assert heads and all(plain[n] == 3.16e-4 and ablated[n] == pytest.approx(3e-3) for n in heads)
    assert all(plain[n] == ablated[n] for n in plain if n not in heads)


def test_auto_specs_are_every_methods_auto_run_kept_to_the_seeds_and_patterns_asked():
    from benchmarks.quality.grid import auto_specs

    full = MODES["full"]
    every = auto_specs(full, "nlu")
    assert len(every) == len(full.nlu_methods) * len(full.nlu_seeds) and all(s.lr == AUTO for s in every)
    assert [s.seed for s in auto_specs(full, "nlg", seeds="1")] == [1] * len(full.nlg_methods)
    assert [s.run_id for s in auto_specs(full, "nlu", only="nlu-lora-*,nlu-full-lrauto-s2")] == [
        "nlu-lora-lrauto-s0", "nlu-lora-lrauto-s1", "nlu-full-lrauto-s2", "nlu-lora-lrauto-s2"]
