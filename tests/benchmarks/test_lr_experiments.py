"""The two lr experiments' readers: the sweep's divergence and lowest points, and the default-lr check's
seed-by-seed comparison (pure functions over recorded numbers)."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.quality.sweep_probe import RISE, read_points, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_default_lr  # noqa: E402


def test_sweep_points_are_where_the_smoothed_loss_turns_up_and_bottoms_out():
    lrs = [1e-4 * 10 ** (k / 10) for k in range(30)]
    losses = [0.7] * 10 + [0.7 - 0.03 * k for k in range(10)] + [0.43 + 0.3 * k for k in range(10)]
    divergence, lowest = read_points({"lrs": lrs, "losses": losses})
    start = 0.7
    first_up = next(i for i in range(len(losses))
                    if sum(losses[max(0, i - 4):i + 1]) / len(losses[max(0, i - 4):i + 1]) > start * (1 + RISE))
    assert divergence == lrs[first_up] and first_up > 20
    assert lrs[17] <= lowest <= lrs[22]


def test_a_sweep_that_never_turns_up_has_no_divergence_and_a_single_spike_is_smoothed_away():
    lrs = [1e-4 * 10 ** (k / 10) for k in range(20)]
    losses = [0.7] * 20
    losses[12] = 1.2  # one noisy batch: the 5-step mean rises by 0.1, under RISE
    divergence, _ = read_points({"lrs": lrs, "losses": losses})
    assert divergence is None


def test_sweep_summary_gives_each_ratio_to_the_grid_best_and_their_spread():
    lrs = [1e-4 * 10 ** (k / 10) for k in range(30)]
    rising = [0.7] * 20 + [0.7 + 0.2 * k for k in range(10)]
    records = [{"label": "lora", "seed": s, "batch": 8, "steps": 30, "lo": 1e-4, "hi": 1e-1, "lrs": lrs,
                "losses": rising[s:] + [9.0] * s} for s in (0, 1)]
    text = summary(records, {"lora": 1e-3}, {"lora": "LoRA r=8"})
    assert "| LoRA r=8 | 0.001 | 0 |" in text and "| LoRA r=8 | 0.001 | 1 |" in text
    assert "divergence / best:" in text and "over 2 sweeps" in text


def test_default_lr_summary_compares_the_lrs_seed_by_seed():
    runs = {}
    for seed, (a, b) in enumerate([(0.30, 0.28), (0.32, 0.33), (0.35, 0.31)]):
        runs[f"lr0.0001-s{seed}"] = {"lr": 1e-4, "seed": seed, "eval_loss": a, "eval_loss_step20": a + 0.1}
        runs[f"lr0.000316-s{seed}"] = {"lr": 3.16e-4, "seed": seed, "eval_loss": b, "eval_loss_step20": b + 0.1}
    record = {"runs": runs, "stamp": {"command": "python benchmarks/bench_default_lr.py", "date": "d", "machine": "m"}}
    text = bench_default_lr.summary(record)
    assert "| 1 | 0.4200 | 0.3200 | 0.4300 | 0.3300 |" in text
    assert "lr 0.000316 minus lr 0.0001, seed by seed: -0.0167 ± 0.0252 (n=3; lr 0.000316 lower on 2 of 3 seeds)" in text


def test_head_ablation_summary_pairs_each_cell_with_the_main_rows_same_lr_and_seed():
    from benchmarks.quality.ablate_head import summary as head_summary

    def rec(label, lr, seed, acc, used=None):
        return {"label": label, "spec": {"lr": lr, "seed": seed}, "accuracy": acc, "lr_used": used or lr}

    arm = [rec("g-headb", 3.16e-4, 0, 0.85), rec("g-headb", 3.16e-4, 1, 0.83), rec("g-headb", "auto", 0, 0.84, 3.16e-4)]
    main = [rec("g", 3.16e-4, 0, 0.84), rec("g", 3.16e-4, 1, 0.84), rec("g", 1e-3, 0, 0.80), rec("other", 3.16e-4, 0, 0.1)]
    text = head_summary(arm, main, "g")
    assert "| 0.000316 | 0 | 84.00 | 85.00 | +1.00 |" in text
    assert "| 0.000316 | 1 | 84.00 | 83.00 | -1.00 |" in text
    assert "| auto | 0 | - | 84.00 (0.000316) | - |" in text  # no main-row auto run: no pair
    assert "- lr 0.000316: head at lr 84.00 ± 0.00, at lora_B's lr 84.00 ± 1.41 (n=2)" in text


def test_line_reading_gives_the_lowest_and_the_last_safe_lr_and_nothing_when_every_step_goes_uphill():
    from benchmarks.quality.line_probe import LATTICE, read_curve, rule_lr

    falling = [{"lr": lr, "held_out_loss": 0.7 - 0.01 * k if k < 15 else 0.56 + 0.2 * (k - 14)}
               for k, lr in enumerate(LATTICE)]
    lr_min, lr_edge = read_curve({"start_loss": 0.7, "curve": falling})
    assert lr_min == LATTICE[14] and lr_edge == LATTICE[14]  # 0.76 at k = 15 is above the start
    uphill = [{"lr": lr, "held_out_loss": 0.71 + k} for k, lr in enumerate(LATTICE)]
    assert read_curve({"start_loss": 0.7, "curve": uphill}) == (None, None)
    assert rule_lr(LATTICE[14]) == LATTICE[10] and rule_lr(LATTICE[2]) == LATTICE[0] and rule_lr(LATTICE[14], 3) == LATTICE[11]
    assert LATTICE[0] == 1e-6 and LATTICE[-1] == 0.1 and len(LATTICE) == 21


def test_the_line_probe_steps_along_one_direction_and_a_tiny_step_leaves_the_loss_where_it_was(tmp_path, monkeypatch):
    from benchmarks.quality import harness
    from benchmarks.quality.grid import AUTO, RunSpec
    from benchmarks.quality.line_probe import LATTICE, measure
    from tests.benchmarks.tiny_workload import build_tiny

    monkeypatch.setattr(harness, "PLAN_CACHE", tmp_path / "plans")
    wl = build_tiny(train_examples=200, test_examples=16)
    spec = RunSpec("nlu", "lora", AUTO, 0)
    curves = {}
    for in_sample, steps, later_on in ((False, 1, "same"), (True, 1, "same"), (True, 2, "same"), (True, 2, "other")):
        record = measure(wl, spec, held=16, in_sample=in_sample, steps=steps, later_on=later_on)
        losses = [c["held_out_loss"] for c in record["curve"]]
        assert [c["lr"] for c in record["curve"]] == LATTICE and record["steps"] == steps
        assert record["scored_on"] == ("in-sample" if in_sample else "held-out")
        assert abs(losses[0] - record["start_loss"]) < 1e-3 * record["start_loss"]  # lr 1e-6: hardly a move
        assert len(set(losses)) > 10  # each lr is its own point along the line
        curves[(steps, later_on)] = losses
    assert curves[(2, "same")] != curves[(2, "other")] != curves[(1, "same")]  # the second step's batch matters
