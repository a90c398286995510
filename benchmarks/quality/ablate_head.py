"""Ablation: the learning rate of a new classification head, for GoRA with gorafit's defaults on NLU.

gorafit trains a new head (MiniLM's classifier) at the base lr, like lora_A, while every lora_B trains at 16 x lr
capped at 3e-3. NLU's runs sit on a plateau until the head has learnt enough, and GoRA's best lr there (1.78e-3)
is above its default (3.16e-4). This arm trains the head at lora_B's (capped) lr instead, everything else as the
main grid's "GoRA, gorafit defaults" row, and compares cell by cell with that row (the same lr and seed: the same
plan, batches and head initialisation). Each run is one JSON file under `ablations/runs/`, so a rerun resumes.

    python benchmarks/quality/ablate_head.py [--lrs 0.000316,0.001,0.00178] [--seeds 0,1,2] [--auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import stamp  # noqa: E402
from benchmarks.quality import harness, workloads  # noqa: E402
from benchmarks.quality.executor import done_records, load_records  # noqa: E402
from benchmarks.quality.grid import AUTO, MODES, RESULTS, _gorafit_defaults, lr_key  # noqa: E402
from goraplan.files import write_json_atomic, write_text_atomic  # noqa: E402

OUT = RESULTS / "ablations"


def gorafit_defaults_row():
    return next(m for m in MODES["full"].nlu_methods if _gorafit_defaults(m))


def _acc(record: dict, auto: bool) -> str:
    return f"{100 * record['accuracy']:.2f}" + (f" ({record['lr_used']:g})" if auto else "")


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def summary(arm: list[dict], main: list[dict], base_label: str) -> str:
    """The arm against the main row, cell by cell (lr, seed), and the means over the seeds both have."""
    def cell(records, label):
        return {(lr_key(r["spec"]["lr"]), r["spec"]["seed"]): r for r in records if r["label"] == label}

    arm_label = arm[0]["label"]
    a, b = cell(arm, arm_label), cell(main, base_label)
    lines = [f"# Ablation: a new head at lora_B's lr (`{arm_label}`) against `{base_label}` (NLU accuracy %)", "",
             "Same plan, batches, head initialisation and lr per cell; only the head's lr differs (the base lr in the "
             "main row, lora_B's capped lr in the arm). 'auto': `--lr auto` (the lr it used in brackets).", "",
             "| lr | seed | head at lr (main grid) | head at lora_B's lr | difference |", "|---|---|---|---|---|"]
    by_lr: dict = {}
    for key in sorted(a, key=lambda k: (k[0] == AUTO, 0.0 if k[0] == AUTO else k[0], k[1])):
        lr, seed = key
        new, old = a[key], b.get(key)
        lr_text = str(lr) if lr == AUTO else f"{lr:g}"
        new_text, old_text = _acc(new, lr == AUTO), _acc(old, lr == AUTO) if old else "-"
        diff = f"{100 * (new['accuracy'] - old['accuracy']):+.2f}" if old else "-"
        lines.append(f"| {lr_text} | {seed} | {old_text} | {new_text} | {diff} |")
        if old:
            by_lr.setdefault(lr_text, []).append((100 * old["accuracy"], 100 * new["accuracy"]))
    lines.append("")
    for lr_text, pairs in by_lr.items():
        olds, news = [o for o, _ in pairs], [n for _, n in pairs]
        lines.append(f"- lr {lr_text}: head at lr {_ms(olds)}, at lora_B's lr {_ms(news)} (n={len(pairs)})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="0.000316,0.001,0.00178")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--auto", action="store_true", help="also run --lr auto on each seed")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    mode = MODES["full"]
    row = gorafit_defaults_row()
    arm = replace(row.template, head_lr="b")
    if not args.report_only:
        torch.set_num_threads(1)
        harness.PLAN_CACHE = mode.results / "cache" / "plans"
        wl = workloads.build_nlu(**mode.nlu)
        lrs: list = [float(x) for x in args.lrs.split(",")] + ([AUTO] if args.auto else [])
        for seed in [int(s) for s in args.seeds.split(",")]:
            for lr in lrs:
                spec = replace(arm, lr=lr, seed=seed)
                path = OUT / "runs" / f"{spec.run_id}.json"
                if path.exists():
                    continue
                record = harness.train_and_evaluate(wl, spec)
                record.update(part="ablation", mode=mode.name, workload_config=mode.nlu,
                              stamp=stamp(["python", "benchmarks/quality/ablate_head.py", *sys.argv[1:]]))
                write_json_atomic(path, record, indent=1)
                print(f"{spec.run_id}: acc {record['accuracy']:.4f} lr {record['lr_used']:g}", flush=True)
    records = load_records(OUT)
    if records:
        text = summary(records, [r for r in done_records(mode) if r["workload"] == "nlu"], row.key)
        write_text_atomic(OUT / "REPORT.md", text)
        print(text)


if __name__ == "__main__":
    main()
