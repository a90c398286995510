"""A measured dead end for `--lr auto` on a new head: one increasing-lr sweep (Smith's range test).

`gorafit.lr_finder`'s walk sees no learning on NLU (MiniLM's new classification head sits on a plateau for longer
than its probe steps), so it keeps the default lr. The usual alternative spends the whole budget on one run whose
lr grows geometrically, and reads the lr off the loss curve: where the loss turns up (divergence), or where it is
lowest, divided by some constant. This script measures whether either point keeps a steady ratio to each method's
grid-best lr across seeds; only then could one constant serve every method.

The sweep uses the range test's budget (about 10 % of the run: 40 steps of 8 on NLU), rows from the end of the
seed's training order (never the test set), each method's own optimizer groups at every step (so LoRA+'s ratio
and GoRA's cap on B's lr hold), the clip at 1.0. Each sweep is one JSON file, so a rerun resumes; the summary
reads the grid-best lrs from the quality benchmark's run files.

    python benchmarks/quality/sweep_probe.py [--seeds 0,1,2] [--steps 40] [--batch 8] [--lo 1e-4] [--hi 1e-1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.quality import harness, workloads  # noqa: E402
from benchmarks.quality.executor import done_records  # noqa: E402
from benchmarks.quality.grid import MODES, RESULTS  # noqa: E402
from benchmarks.quality.stats import Cells  # noqa: E402
from goraplan.files import write_json_atomic, write_text_atomic  # noqa: E402

OUT = RESULTS / "sweep-probe"
SMOOTH = 5  # moving average over this many steps (batch-8 losses are noisy)
RISE = 0.25  # "divergence": the smoothed loss this much (relative) above its start


def sweep(wl: harness.Workload, spec, batch: int, steps: int, lo: float, hi: float) -> dict:
    """One run at lr lo * (hi/lo)^(k/(steps-1)) for step k, from the method's start; the loss of each step."""
    setup, _, _ = harness.prepare(wl, spec)
    order = torch.randperm(len(wl.train_rows), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    rows = order[-batch * steps:]
    batches = [wl.collate([wl.train_rows[i] for i in rows[k:k + batch]]) for k in range(0, len(rows), batch)]
    optimizer = setup.make_optimizer(lo)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    cpu0 = time.process_time()
    lrs, losses = [], []
    setup.model.train()
    for k, b in enumerate(batches):
        lr = lo * (hi / lo) ** (k / (steps - 1))
        for group, ref in zip(optimizer.param_groups, setup.make_optimizer(lr).param_groups, strict=True):
            group["lr"] = ref["lr"]  # the method's own groups at this lr (ratio, cap)
        loss = setup.model(**b).loss
        lrs.append(lr)
        losses.append(loss.item())
        if not math.isfinite(loss.item()):
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, harness.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"label": spec.label, "seed": spec.seed, "batch": batch, "steps": steps, "lo": lo, "hi": hi,
            "lrs": lrs, "losses": losses, "cpu_s": round(time.process_time() - cpu0, 3)}


def read_points(record: dict) -> tuple[float | None, float]:
    """The divergence lr (smoothed loss RISE above its start; None if never) and the lr of the lowest smoothed loss."""
    losses, lrs = record["losses"], record["lrs"]
    smooth = [statistics.mean(losses[max(0, i - SMOOTH + 1):i + 1]) for i in range(len(losses))]
    start = statistics.mean(losses[:SMOOTH])
    divergence = next((lrs[i] for i, s in enumerate(smooth) if not s <= start * (1 + RISE)), None)
    lowest = lrs[min(range(len(smooth)), key=smooth.__getitem__)]
    return divergence, lowest


def summary(records: list[dict], best: dict[str, float], names: dict[str, str]) -> str:
    lines = ["# One increasing-lr sweep as `--lr auto`'s rule on NLU (measured, not adopted)", "",
             f"Each row: one sweep of {records[0]['steps']} steps of {records[0]['batch']} from lr "
             f"{records[0]['lo']:g} to {records[0]['hi']:g} (about the range test's 10 % budget), rows from the "
             f"end of the seed's training order. 'divergence': the first lr where the loss, smoothed over {SMOOTH} "
             f"steps, is {RISE:.0%} above its start; 'lowest': the lr of the lowest smoothed loss. A rule "
             "'lr = point / c' works only if the ratio to the grid-best lr (REPORT.md, NLU) is about constant.", "",
             "| method | grid-best lr | seed | divergence lr | divergence / best | lowest lr | lowest / best |",
             "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {"divergence": [], "lowest": []}
    for r in sorted(records, key=lambda r: (list(names).index(r["label"]) if r["label"] in names else 99, r["seed"])):
        b = best.get(r["label"])
        div, low = read_points(r)
        cells = [f"{div:.3g}" if div else "none", f"{div / b:.1f}" if div and b else "-", f"{low:.3g}",
                 f"{low / b:.2f}" if b else "-"]
        if b:
            if div:
                ratios["divergence"].append(div / b)
            ratios["lowest"].append(low / b)
        row = [names.get(r["label"], r["label"]), f"{b:g}" if b else "-", str(r["seed"]), *cells]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for point, values in ratios.items():
        if values:
            lines.append(f"- {point} / best: {min(values):.2f} .. {max(values):.2f} over {len(values)} sweeps "
                         f"(a factor {max(values) / min(values):.0f} apart; the grid's lrs are 1.78x apart)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lo", type=float, default=1e-4)
    parser.add_argument("--hi", type=float, default=1e-1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    mode = MODES["full"]
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        wl = workloads.build_nlu(**mode.nlu)
        for m in mode.nlu_methods:
            for seed in [int(s) for s in args.seeds.split(",")]:
                path = OUT / f"nlu-{m.key}-s{seed}-b{args.batch}x{args.steps}-{args.lo:g}-{args.hi:g}.json"
                if path.exists():
                    continue
                record = sweep(wl, replace(m.template, lr=args.lo, seed=seed), args.batch, args.steps, args.lo, args.hi)
                write_json_atomic(path, {**record, "command": " ".join(["python", *sys.argv])})
                print(path.name, read_points(record), flush=True)
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("nlu-*.json"))]
    cells = Cells([r for r in done_records(mode) if r["workload"] == "nlu"])
    best = {m.key: cells.best_lr(m.key) for m in mode.nlu_methods}
    names = {m.key: m.name for m in mode.nlu_methods}
    if records:
        text = summary(records, best, names)
        write_text_atomic(RESULTS / "sweep-probe.md", text)
        print(text)


if __name__ == "__main__":
    main()
