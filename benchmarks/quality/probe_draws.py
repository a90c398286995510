"""How much of `--lr auto`'s choice on NLG is the draw of its probe rows, and what a steadier probe costs.

`gorafit.lr_finder`'s range test trains each candidate lr a few steps on rows from the end of the seed's
training order and scores one held-out batch of other training rows. On NLG its choice moves by one to two
decades between seeds (GoRA with gorafit's defaults: 5.62e-4 on seed 0, 1e-5 on seed 1). This script keeps the
model's seed (its adapter's start) fixed and redraws only the probe's rows: draw 0 is exactly what the run used,
draw d takes the next disjoint slice towards the front of the same order. A variant changes the probe's shape
(held-out rows, probe batch) with its steps sized to the same 10 % budget (`probe_steps_for_budget`).

Each search is one JSON file under `probe-draws/`, so a rerun resumes; the summary (`probe-draws.md`) puts each
choice beside the method's grid-best lr and, where the grid has the run, the exact match it scored.

    python benchmarks/quality/probe_draws.py --methods gora-x16-bmax0.003,lora --seeds 0,1 --draws 4 \
        --variants now,held32 [--report-only]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.quality import harness, workloads  # noqa: E402
from benchmarks.quality.executor import done_records  # noqa: E402
from benchmarks.quality.grid import MODES, RESULTS, nearly  # noqa: E402
from benchmarks.quality.stats import Cells  # noqa: E402
from gorafit.lr_finder import find_lr, probe_steps_for_budget  # noqa: E402
from goraplan.files import write_json_atomic, write_text_atomic  # noqa: E402

OUT = RESULTS / "probe-draws"
# name -> (probe batch, held-out rows): the run's today (a quarter of its batch; one batch held out), and wider
VARIANTS = {"now": (2, 8), "held32": (2, 32), "warm": (2, 8), "b4": (4, 8), "b8": (8, 8), "settle": (2, 8),
            "settle-b4": (4, 8)}
WARMUP = {"warm"}  # variants whose short runs warm up linearly over their steps, as the run does
# variants whose short runs start from Adam moments settled at lr 0 on as many other probe batches (one more
# candidate's worth of the budget)
SETTLE = {"settle", "settle-b4"}
FAR = 2.5  # a choice more than 2 quarter-decades (grid steps) from the grid best


def quarter_decades(lr: float, best: float) -> float:
    """How many grid steps (quarter-decades) `lr` lies from `best`."""
    return abs(4 * math.log10(lr / best))


def probe_data(wl: harness.Workload, seed: int, draw: int, probe: int, held: int, settle: bool = False
               ) -> tuple[list[dict], list[dict], int]:
    """Draw `draw`'s short-run batches and held-out batches (of at most the run's batch), and the steps per candidate
    (with `settle`, twice the short-run batches: the first half settles the moments, the second half trains)."""
    steps = probe_steps_for_budget(wl.steps, wl.batch_size, probe, held, share=harness.AUTO_SHARE,
                                   candidates=harness.AUTO_CANDIDATES + settle)
    need = held + (1 + settle) * steps * probe
    order = torch.randperm(len(wl.train_rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = order[len(order) - (draw + 1) * need:len(order) - draw * need]
    held_rows, train_rows = rows[-held:], rows[:-held]

    def collate(ix: list[int]) -> dict:
        return wl.collate([wl.train_rows[i] for i in ix])

    train = [collate(train_rows[i:i + probe]) for i in range(0, len(train_rows), probe)]
    held_out = [collate(held_rows[i:i + wl.batch_size]) for i in range(0, held, wl.batch_size)]
    return train, held_out, steps


def search(wl: harness.Workload, spec, draw: int, variant: str) -> dict:
    probe, held = VARIANTS[variant]
    setup, _, _ = harness.prepare(wl, spec)
    train, held_out, steps = probe_data(wl, spec.seed, draw, probe, held, settle=variant in SETTLE)
    settle, train = train[:len(train) - steps], train[len(train) - steps:]
    found = find_lr(setup.model, setup.make_optimizer, train, held_out, max_grad_norm=harness.MAX_GRAD_NORM,
                    max_candidates=harness.AUTO_CANDIDATES, warmup=variant in WARMUP, settle_batches=settle)
    return {"label": spec.label, "seed": spec.seed, "draw": draw, "variant": variant, "probe_batch": probe,
            "held_out_rows": held, "steps": steps, "search": found.to_dict()}


def summary(records: list[dict], runs: list[dict], names: dict[str, str]) -> str:
    cells = Cells(runs)
    lines = ["# `--lr auto` on NLG: the choice against the draw of the probe's rows", "",
             "The model's seed (its adapter's start) is fixed; only the probe's rows are redrawn (draw 0 is what the "
             "run used). Variants: probe batch x held-out training rows, steps per candidate sized to the same 10 % "
             "budget. `now`: today's probe (batches of 2, 8 held-out rows); `held32`: 32 held-out rows; `b4`/`b8`: "
             "probe batches of 4 or 8; `warm`: each short run's lr climbs linearly over its steps; `settle` and "
             "`settle-b4` (batches of 4): each short run starts from Adam moments settled at lr 0 on as many other "
             "probe batches (one more candidate's worth of the budget). A variant that needs more rows than `now` "
             "takes a longer slice of the order, so its draw d shares the held-out rows with `now`'s only at d = 0. "
             "'EM at choice': the exact match of the benchmark's run at that lr and seed (grid or auto) where one "
             "exists ('-' where not).", "",
             "| method | seed | grid-best lr | variant | steps | chosen lr by draw | quarter-decades from best | "
             "EM at choice (%) |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["label"], r["seed"], r["variant"]), []).append(r)
    spread: dict[str, list[float]] = {}
    distance: dict[str, list[float]] = {}  # |chosen / grid best| in quarter-decades (the grid's steps)
    known: dict[str, list[float]] = {}  # exact match at the choices that have a run
    for (label, seed, variant), rs in sorted(groups.items(), key=lambda kv: (list(names).index(kv[0][0])
                                                                          if kv[0][0] in names else 99, kv[0][1:])):
        rs.sort(key=lambda r: r["draw"])
        best = cells.best_lr(label)
        chosen = [r["search"]["chosen"] for r in rs]
        scores = []  # exact match % at each choice, None without a run
        for lr in chosen:
            at_seed = [rec["accuracy"] for rec in runs if rec["label"] == label and rec["spec"]["seed"] == seed
                       and nearly(rec["lr_used"], lr)]
            scores.append(100 * at_seed[0] if at_seed else None)
        logs = [math.log10(c) for c in chosen]
        spread.setdefault(variant, []).append(statistics.pstdev(logs) if len(logs) > 1 else 0.0)
        off = [quarter_decades(c, best) for c in chosen] if best else []
        distance.setdefault(variant, []).extend(off)
        known.setdefault(variant, []).extend(x for x in scores if x is not None)
        row = [names.get(label, label), str(seed), f"{best:g}" if best else "-", variant, str(rs[0]["steps"]),
               ", ".join(f"{c:.3g}" for c in chosen), ", ".join(f"{x:.0f}" for x in off) or "-",
               ", ".join("-" if x is None else f"{x:.1f}" for x in scores)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for variant, values in spread.items():
        d, em = distance[variant], known[variant]
        lines.append(f"- {variant}: spread of log10(chosen lr) over draws, mean over rows {statistics.mean(values):.2f} "
                     f"decades ({len(values)} rows); from the grid best: mean {statistics.mean(d):.2f} quarter-decades, "
                     f"{sum(x > FAR for x in d)} of {len(d)} choices more than 2 away; EM at the {len(em)} choices with "
                     f"a run: mean {statistics.mean(em) if em else float('nan'):.1f}, min {min(em, default=float('nan')):.1f}")
    lines += ["", "Paired with `now` on the same (method, seed, draw): mean distance from the grid best in quarter-decades, "
              "and how many choices are more than 2 away.", "", "| variant | searches | distance: variant | now | >2 away: variant | now |",
              "|---|---|---|---|---|---|"]
    by_key = {(r["label"], r["seed"], r["draw"], r["variant"]): r for r in records}
    for variant in sorted({r["variant"] for r in records} - {"now"}):
        pairs = []
        for (label, seed, draw, v), r in by_key.items():
            base, best = by_key.get((label, seed, draw, "now")), cells.best_lr(label)
            if v == variant and base and best:
                pairs.append(tuple(quarter_decades(x["search"]["chosen"], best) for x in (r, base)))
        if pairs:
            ours, now = zip(*pairs, strict=True)
            lines.append(f"| {variant} | {len(pairs)} | {statistics.mean(ours):.2f} | {statistics.mean(now):.2f} | "
                         f"{sum(x > FAR for x in ours)} | {sum(x > FAR for x in now)} |")
    lines += ["", "Read again with another last step (offline, on the same candidates): the largest lr whose held-out loss is "
              "within `tol` of the lowest, when learning was seen (the usual remedy for a short probe's pull towards "
              "small lrs). Mean distance from the grid best in quarter-decades, and choices more than 2 away.", "",
              "| variant | searches | " + " | ".join(f"tol {t:.0%}" for t in TOLERANCES) + " |",
              "|---|---|" + "---|" * len(TOLERANCES)]
    for variant in sorted({r["variant"] for r in records}):
        rows = [r for r in records if r["variant"] == variant and cells.best_lr(r["label"])]
        cols = []
        for tol in TOLERANCES:
            d = [quarter_decades(within(r["search"], tol), cells.best_lr(r["label"])) for r in rows]
            cols.append(f"{statistics.mean(d):.2f} ({sum(x > FAR for x in d)})")
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


TOLERANCES = (0.0, 0.02, 0.05, 0.10)


def within(search: dict, tol: float) -> float:
    """The search's choice if the last step took the largest lr within `tol` (relative) of the lowest held-out loss."""
    finite = [c for c in search["candidates"] if c["held_out_loss"] is not None]
    lowest = min((c["held_out_loss"] for c in finite), default=math.inf)
    if not lowest < search["start_loss"] * (1 - search["extra"]["gain_needed"]):
        return search["chosen"]  # no learning seen: the default was kept
    return max(c["lr"] for c in finite if c["held_out_loss"] <= lowest * (1 + tol))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gora-x16-bmax0.003,lora")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--variants", default="now,held32")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    mode = MODES["full"]
    by_key = {m.key: m for m in mode.nlg_methods}
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        wl = workloads.build_nlg(**mode.nlg)
        for key in args.methods.split(","):
            for variant in args.variants.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    for draw in range(args.draws):
                        path = OUT / f"nlg-{key}-s{seed}-{variant}-d{draw}.json"
                        if path.exists():
                            continue
                        torch.manual_seed(seed)
                        record = search(wl, replace(by_key[key].template, lr=1e-3, seed=seed), draw, variant)
                        write_json_atomic(path, {**record, "command": " ".join(["python", *sys.argv])})
                        print(path.name, record["search"]["chosen"], record["search"]["seconds"], flush=True)
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("nlg-*.json"))]
    runs = [r for r in done_records(mode) if r["workload"] == "nlg"]
    names = {m.key: m.name for m in mode.nlg_methods}
    if records:
        text = summary(records, runs, names)
        write_text_atomic(RESULTS / "probe-draws.md", text)
        print(text)


if __name__ == "__main__":
    main()
