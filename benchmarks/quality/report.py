"""The quality report, rebuilt from the run files: ``<results>/REPORT.md`` and its PNG charts.

Nothing is typed in by hand: every number comes from ``<results>/runs/*.json`` and
``<results>/curvature/*.json``; the report says which planned cells are done (n of N).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.quality.executor import done_records, serving_first_seed_best, todo, workload_config
from benchmarks.quality.grid import (
    AUTO,
    LORA_ALPHA,
    LORA_RANK,
    MODES,
    ROOT,
    Method,
    Mode,
    is_gora,
    nearly,
    planned,
    serving_planned,
)
from benchmarks.quality.harness import AUTO_SHARE, COLLAPSE_SHARE, MAX_GRAD_NORM, WARMUP_RATIO, WEIGHT_DECAY
from benchmarks.quality.stats import Cells, margin, mean_std, spearman
from gorafit.lr_finder import EDGE, GAIN, OPTIMIZER_OVERHEAD, STEP_OVERHEAD
from gorafit.optim import LR_DEFAULT
from goraplan.files import write_text_atomic

WORKLOADS = {"nlu": "NLU: MiniLM-L6 on sarcasm headlines (accuracy)",
             "nlg": "NLG: SmolLM2-135M on three-digit arithmetic (exact match; completion loss)"}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ms(values: list[float], scale: float = 100, digits: int = 2) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f} (n={len(values)})"


def _margin(a: list[float], b: list[float], scale: float = 100, digits: int = 2) -> str:
    if not a or not b:
        return "-"
    d, se = margin(a, b)
    return f"{scale * d:+.{digits}f} ± {scale * se:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _geo(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


# ---------------------------------------------------------------------------------------------------- coverage
def coverage(mode: Mode, records: list[dict]) -> str:
    have = {r["run_id"] for r in records}
    rows = []
    for wl, methods in (("nlu", mode.nlu_methods), ("nlg", mode.nlg_methods)):
        plan = [(p, s) for p, s in planned(mode) if s.workload == wl]
        for m in methods:
            mine = [(p, s) for p, s in plan if s.label == m.key]
            auto = [s for p, s in mine if p == "auto"]
            grid = [s for p, s in mine if p == "grid"]
            rows.append([wl, m.name, f"{sum(s.run_id in have for s in auto)} of {len(auto)}",
                         f"{sum(s.run_id in have for s in grid)} of {len(grid)}",
                         f"{m.lrs[0]:g} .. {m.lrs[-1]:g} ({len(m.lrs)} lrs)"])
    return _table(["workload", "method", "auto runs done", "grid runs done", "lr window"], rows)


# ---------------------------------------------------------------------------------------------------- per workload
def main_table(cells: Cells, methods: list[Method], key: str, lower: bool, scale: float, digits: int) -> str:
    rows = []
    for m in methods:
        best = cells.best_lr(m.key, key, lower)
        best_v = cells.values(m.key, best, key) if best is not None else []
        auto_r = cells.records(m.key, AUTO)
        auto_v = [r[key] for r in auto_r]
        chosen = ", ".join(f"s{r['spec']['seed']}: {r['lr_used']:.3g}" for r in sorted(auto_r, key=lambda r: r["spec"]["seed"]))
        edge = ""
        if best is not None and m.lrs and (math.isclose(best, m.lrs[0], rel_tol=1e-2) or math.isclose(best, m.lrs[-1], rel_tol=1e-2)):
            edge = " (window edge)"
        cb, nb = cells.collapsed(m.key, best) if best is not None else (0, 0)
        ca, na = cells.collapsed(m.key, AUTO)
        cg, ng = sum(cells.collapsed(m.key, lr)[0] for lr in cells.lrs(m.key)), sum(cells.collapsed(m.key, lr)[1] for lr in cells.lrs(m.key))
        cells_done = sum(bool(cells.values(m.key, lr, key)) for lr in m.lrs)
        rows.append([m.name, f"{cells_done} of {len(m.lrs)}", f"{best:.3g}{edge}" if best is not None else "-",
                     _ms(best_v, scale, digits), _near_best(cells, m, key, lower, scale),
                     chosen or "-", _ms(auto_v, scale, digits), _margin(auto_v, best_v, scale, digits),
                     f"{cb}/{nb}", f"{ca}/{na}", f"{cg}/{ng}"])
    return _table(["method", "grid lrs done", "grid-best lr (of those)", "at grid-best",
                   f"lrs within {NEAR_BEST:g} of the best", "auto lr per seed", "with auto", "auto - best",
                   "collapsed at best", "collapsed with auto", "collapsed, whole grid"], rows)


NEAR_BEST = 2.0  # points (accuracy %) or, for a loss, hundredths: how forgiving a method is of its lr


def _near_best(cells: Cells, m: Method, key: str, lower: bool, scale: float) -> str:
    """How many of the grid lrs done score within NEAR_BEST of the best one (means over seeds): the width of
    the lr window a user can miss the best by without losing much."""
    means = [mean_std(cells.values(m.key, lr, key))[0] * scale for lr in m.lrs if cells.values(m.key, lr, key)]
    if not means:
        return "-"
    tol = NEAR_BEST if scale == 100 else NEAR_BEST / 100
    best = min(means) if lower else max(means)
    return f"{sum(abs(v - best) <= tol for v in means)} of {len(means)}"


def gora_vs(cells: Cells, methods: list[Method], key: str, lower: bool, scale: float, digits: int) -> str:
    """Each GoRA variant against every other method, each at its grid-best lr and each with auto."""
    sign = -1 if lower else 1

    def best(label):
        lr = cells.best_lr(label, key, lower)
        return cells.values(label, lr, key) if lr is not None else []

    rows = []
    for g in [m for m in methods if is_gora(m.key)]:
        for other in [m for m in methods if m.key != g.key]:
            a_best, b_best = best(g.key), best(other.key)
            a_auto, b_auto = cells.values(g.key, AUTO, key), cells.values(other.key, AUTO, key)
            rows.append([g.name, other.name, _signed(a_best, b_best, sign, scale, digits),
                         _signed(a_auto, b_auto, sign, scale, digits)])
    better = "higher" if not lower else "lower loss"
    return (f"Positive = GoRA better ({better}).\n\n"
            + _table(["GoRA variant", "vs", "both at grid-best lr", "both with auto"], rows))


def _signed(a, b, sign, scale, digits) -> str:
    if not a or not b:
        return "-"
    d, se = margin(a, b)
    return f"{sign * scale * d:+.{digits}f} ± {scale * se:.{digits}f}"


def grid_table(cells: Cells, methods: list[Method], key: str, scale: float, digits: int) -> str:
    lrs = sorted({lr for m in methods for lr in m.lrs})
    rows = []
    for m in methods:
        row = [m.name]
        for lr in lrs:
            v = cells.values(m.key, lr, key)
            c, n = cells.collapsed(m.key, lr)
            if not any(math.isclose(lr, x, rel_tol=1e-2) for x in m.lrs):
                row.append("")
            elif not v:
                row.append("·")
            else:
                mu, sd = mean_std(v)
                row.append(f"{scale * mu:.{digits}f}±{scale * sd:.{digits}f} ({len(v)}{', ' + str(c) + 'c' if c else ''})")
        rows.append(row)
    return ("Mean ± std (seeds done, collapsed runs 'c'); '·' = planned, not run yet; blank = outside the method's window.\n\n"
            + _table(["method"] + [f"{lr:.3g}" for lr in lrs], rows))


def cost_table(cells: Cells, methods: list[Method]) -> str:
    rows = []
    for m in methods:
        auto = cells.records(m.key, AUTO)
        if not auto:
            rows.append([m.name, "-", "-", "-", "-"])
            continue
        a = [r["auto_cpu_s"] for r in auto]
        t = [r["train_cpu_s"] for r in auto]
        shares = [r["auto_share"] for r in auto]
        ncand = [len(r["lr_search"]["candidates"]) for r in auto]
        rows.append([m.name, f"{statistics.fmean(a):.1f}", f"{statistics.fmean(t):.1f}",
                     f"{100 * statistics.fmean(shares):.1f}% (max {100 * max(shares):.1f}%)",
                     f"{statistics.fmean(ncand):.1f} x {auto[0]['lr_search']['steps_per_candidate']} steps"])
    return _table(["method", "auto CPU s (mean)", "training CPU s (mean)", "auto / training (CPU)",
                   "candidates x steps"], rows)


def curvature_table(mode: Mode, wl: str, cells: Cells, methods: list[Method]) -> str:
    folder = mode.results / "curvature"
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{wl}-*.json"))] if folder.is_dir() else []
    recs = [r for r in recs if r.get("workload_config") == workload_config(mode, wl)]
    rows, xs, ys = [], [], []
    for m in methods:
        lam = [r["lambda_max"] for r in recs if r["label"] == m.key]
        best = cells.best_lr(m.key)
        auto = [r["lr_used"] for r in cells.records(m.key, AUTO)]
        if lam and best is not None and statistics.fmean(lam) > 0:
            xs.append(1 / statistics.fmean(lam))
            ys.append(best)
        rows.append([m.name, _ms(lam, 1, 3) if lam else "-", f"{best:.3g}" if best is not None else "-",
                     f"{best * statistics.fmean(lam):.3g}" if lam and best is not None else "-",
                     f"{_geo(auto):.3g}" if auto else "-"])
    rho = spearman(xs, ys)
    note = (f"Spearman rank correlation between 1/lambda_max and the grid-best lr over the {len(xs)} methods "
            f"that have both: {rho:.2f}." if rho is not None else
            f"Too few methods with both a curvature and a grid-best lr ({len(xs)}) for a rank correlation.")
    note += (" A grid-best lr over few done cells is a weak point of comparison: see 'grid lrs done' above.")
    return (_table(["method", "lambda_max (mean ± std over seeds)", "grid-best lr", "best lr x lambda_max",
                    "auto lr (geometric mean)"], rows) + "\n\n" + note)


def plot(cells: Cells, methods: list[Method], key: str, ylabel: str, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goraplan.files import atomic_file

    if not any(cells.values(m.key, lr, key) for m in methods for lr in [*cells.lrs(m.key), AUTO]):
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for m in methods:
        lrs = [lr for lr in cells.lrs(m.key) if cells.values(m.key, lr, key)]
        if not lrs:
            continue
        means = [mean_std(cells.values(m.key, lr, key))[0] for lr in lrs]
        line, = ax.plot(lrs, means, marker="o", markersize=3, label=m.name, linestyle="-" if is_gora(m.key) else "--")
        auto = cells.records(m.key, AUTO)
        ax.scatter([r["lr_used"] for r in auto], [r[key] for r in auto], marker="*", s=90, color=line.get_color(),
                   zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (stars: --lr auto's choice and its score, one per seed)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------- serving
SERVE_RESULTS = ROOT / "benchmarks" / "results" / "serve.json"


def _serve_rank(m: Method) -> int:
    t = m.template
    return t.compress_to or (t.max_rank if t.method == "gora" else LORA_RANK)


def _serving_cost(m: Method, serve: dict | None) -> list[str]:
    """vs-floor throughput of the serve benchmark's adapter with the same `--max-lora-rank` (what vLLM pads to)."""
    if serve is None:
        return ["-", "-", "-"]
    name = "LoRA r=8" if m.template.method == "lora" else f"GoRA r_max {_serve_rank(m)}"
    rows = {r["setup"]: r for r in serve["results"] if r["adapter"] == name}
    return [f"{rows[k]['vs_floor']:.2f}" if k in rows else "-" for k in ("1x-default", "1x-limited", "4x-limited")]


def serving_section(mode: Mode, records: list[dict]) -> str:
    """Quality against serving cost: each serving arm's NLU accuracy at its best lr (of its window, mean over the
    seeds done), its NLG scores with --lr auto, and the serve benchmark's throughput at its `--max-lora-rank`."""
    serve = json.loads(SERVE_RESULTS.read_text()) if SERVE_RESULTS.is_file() else None
    have = {r["run_id"] for r in records}
    first_best = serving_first_seed_best(mode, records)
    runs = serving_planned(mode, first_best)
    nlu, nlg = (Cells([r for r in records if r["workload"] == w]) for w in ("nlu", "nlg"))
    rows = []
    nlg_arms = {g.key: g for g in mode.serving_nlg}
    for m in mode.serving_nlu:
        best = first_best.get(m.key)  # chosen on the first seed; the other seeds run there
        best_v = nlu.values(m.key, best) if best is not None else []
        edge = " (edge)" if best is not None and (nearly(best, m.lrs[0]) or nearly(best, m.lrs[-1])) else ""
        kept = [r["compression"]["report"]["norm_kept_total"] for r in nlu.records(m.key, best)
                if r.get("compression")] if best is not None else []
        before = [r["compression"]["uncompressed"]["accuracy"] for r in nlu.records(m.key, best)
                  if r.get("compression")] if best is not None else []
        auto = nlg.records(m.key, AUTO) if m.key in nlg_arms else []
        done = sum(s.run_id in have for _, s in runs if s.label == m.key)
        total = sum(1 for _, s in runs if s.label == m.key)
        rows.append([m.name, _serve_rank(m), *_serving_cost(m, serve), f"{best:.3g}{edge}" if best else "-",
                     _ms(best_v), _ms(before) if before else "", f"{100 * statistics.fmean(kept):.2f}" if kept else "",
                     _ms([r["accuracy"] for r in auto]), _ms([r["eval_loss"] for r in auto], 1, 4),
                     f"{done} of {total}"])
    source = (f"`{serve['stamp']['command']}` ({serve['stamp']['date'][:10]}, vLLM {serve['results'][0]['vllm_version']} "
              f"on CPU)" if serve else "not measured")
    return ("tokens/s vs the merged model (the floor), from the serve benchmark " + source + ": an adapter's "
            "serving cost is set by the `--max-lora-rank` it needs, so the compressed arm costs what GoRA r_max 16 "
            "costs. 'limited': vLLM's LoRA wrappers limited to the adapter's modules (`--lora-target-modules`, what "
            "`gorafit export` prints). NLU: accuracy % at the arm's best lr (the first seed tries its 3 lrs, the "
            "other seeds run at the best of them; mean ± std over seeds); the "
            "compressed arm also shows the same adapter before compression and the share of the update's norm "
            "the truncated SVD kept. NLG: `--lr auto`.\n\n"
            + _table(["arm", "--max-lora-rank", "tokens/s vs floor, 1 adapter", "1 adapter, limited",
                      "4 adapters, limited", "NLU best lr", "NLU accuracy %", "before compression",
                      "norm kept %", "NLG exact match % (auto)", "NLG completion loss (auto)", "runs done"], rows))


# ---------------------------------------------------------------------------------------------------- sizing
PROXY = {"rslora": "lora", "loraplus": "lora", "pissa": "lora", "loraga": "lora"}  # same step cost, other init


def _run_cost(r: dict, steps: int, test_examples: int, calib: int) -> float:
    """A run's CPU seconds rescaled to `steps` training steps, `test_examples` and `calib` calibration batches:
    training per step, evaluation per test example, setup (plan / LoRA-GA) per calibration batch, auto at
    its measured share of training."""
    train = r["train_cpu_s"] / r["steps"] * steps
    setup = r.get("setup_cpu_s", r["setup_s"])  # older runs kept wall seconds only: an upper bound
    rest = max(0.0, r["cpu_s"] - r["train_cpu_s"] - r["auto_cpu_s"] - setup)  # evaluation and loading
    setup *= calib / max(1, r["method_info"].get("calib_batches", calib))
    auto = train * (r["auto_cpu_s"] / r["train_cpu_s"]) if r["auto_cpu_s"] else 0.0
    return train + rest * test_examples / r["examples"] + setup + auto


def sizing(mode: Mode, records: list[dict], reference: list[dict]) -> str:
    """CPU seconds per run and what the rest of the grid costs: measured on this mode's runs where there are
    some, else rescaled from `reference` runs (quick mode) of the same method, or of LoRA for a LoRA variant."""
    rows, total_left, total_all = [], 0.0, 0.0
    left = todo(mode)
    plan = planned(mode)
    sizes = {"nlu": (mode.nlu, 32), "nlg": (mode.nlg, 8)}
    for wl, methods in (("nlu", mode.nlu_methods), ("nlg", mode.nlg_methods)):
        size, batch = sizes[wl]
        steps = math.ceil(size["train_examples"] / batch)
        for m in methods:
            n_left = sum(1 for _, s in left if s.workload == wl and s.label == m.key)
            n_all = sum(1 for _, s in plan if s.workload == wl and s.label == m.key)
            mine = [r for r in records if r["workload"] == wl and r["label"] == m.key]
            source = "measured here"
            if not mine:
                base = m.template.method if m.template.method not in PROXY else PROXY[m.template.method]
                ref = [r for r in reference if r["workload"] == wl and r["spec"]["method"] == base]
                mine = [dict(r, cpu_s=_run_cost(r, steps, size["test_examples"], m.template.n_calib)) for r in ref]
                source = f"rescaled from quick-mode {base}" if ref else "not measured"
            if not mine:
                rows.append([wl, m.name, "-", source, n_left, "-"])
                continue
            sec = statistics.fmean(r["cpu_s"] for r in mine)
            total_left += sec * n_left
            total_all += sec * n_all
            rows.append([wl, m.name, f"{sec:.0f}", source, n_left, f"{sec * n_left / 3600:.2f}"])
    text = _table(["workload", "method", "CPU s per run", "how known", "runs left", "CPU hours left"], rows)
    text += (f"\n\nThe whole grid ({len(plan)} runs) costs about **{total_all / 3600:.1f} CPU hours**; the {len(left)} runs "
             f"left about **{total_left / 3600:.1f} CPU hours**: {total_left / 7200:.1f} hours of wall time for two "
             "one-thread workers on an otherwise idle 2-core machine (more while other jobs share it). Curvature "
             "measurements are extra (see their seconds in `curvature/`).")
    return text


# ---------------------------------------------------------------------------------------------------- the report
def write_report(mode: Mode, stamp: dict) -> Path:
    records = done_records(mode)
    mode.results.mkdir(parents=True, exist_ok=True)
    plan = planned(mode)
    have = {r["run_id"] for r in records}
    n_done = sum(s.run_id in have for _, s in plan)
    out = [f"# Every method at its grid-best learning rate and with `--lr auto` ({mode.name} mode)", "",
           f"Generated by `{stamp['command']}` on {stamp['date']}; machine: {stamp['machine']}; versions: "
           + ", ".join(f"{k} {v}" for k, v in stamp["versions"].items())
           + ". Every number below is computed from the run files in `runs/` and `curvature/` (each carries its "
             "own command, versions, machine and date).", "",
           f"**Coverage: {n_done} of {len(plan)} planned runs done.** Cells not done are marked; means are over "
           "the seeds done.", "", coverage(mode, records), "", "## Setup (the same for every method)", ""]
    for wl in ("nlu", "nlg"):
        rs = [r for r in records if r["workload"] == wl]
        if rs:
            e = rs[0]["workload_extra"]
            out.append(f"- `{wl}`: {rs[0]['workload_description']}; model {e['model']}; data: {e['data']}; "
                       f"score: {e['score']}; {rs[0]['steps']} steps of {rs[0]['batch_size']} examples.")
    out += [
        f"- One epoch, AdamW (weight decay {WEIGHT_DECAY}), cosine schedule with {WARMUP_RATIO:.0%} warm-up, "
        f"gradient-norm clip {MAX_GRAD_NORM}, float32, one torch thread per worker, the same batches in the same "
        "order for every method (the order depends on the seed only; the seed also draws the head and random A).",
        f"- Adapters: r0 = {LORA_RANK}, alpha {LORA_ALPHA:g}, no dropout, the same module list for every method "
        "(NLU: every linear layer of the encoder, the head trains in every method; NLG: q/k/v/o). LoRA+ is "
        "peft's `create_loraplus_optimizer` (ratio 16). PiSSA and LoRA-GA are PEFT's. GoRA: `goraplan.build_plan` "
        f"(N = {[*mode.nlu_methods, *mode.serving_nlu][0].template.n_calib} calibration batches of 8, also LoRA-GA's) and "
        "`gorafit.apply_plan`; its optimizer is `gorafit.create_optimizer` (B at 16x, capped at gorafit's default) "
        "for 'gorafit defaults', one lr for 'x1'.",
        "- **lr grid**: quarter-decades (neighbours 1.78x apart), 9 points over two decades per method, the window "
        "placed where the method trains (see the coverage table).",
        f"- **`--lr auto`** (`gorafit.lr_finder.search_training_data`, what `gorafit run --lr auto` runs): a range "
        f"test on training batches only (the end of the seed's order): from the method's initial weights, a few "
        f"short steps at each candidate lr with AdamW over the method's own groups, its moments first settled at "
        f"lr 0 on as many other training batches (a fresh Adam's first steps are full-lr sign steps), scored by "
        f"the loss on one held-out training batch, weights put back between candidates. Candidates walk the "
        f"quarter-decade lattice from 1e-3 in half-decade steps to bracket the stability edge (the largest lr "
        f"whose held-out loss stays within {EDGE:.0%} of the start's). If some candidate lowers the held-out loss "
        f"by {GAIN:.0%} or more (learning seen), the lowest held-out loss wins; if none does (a new head's "
        f"plateau), gorafit's default lr {LR_DEFAULT:g} is kept and the edge recorded. Each run file keeps the "
        f"rule used. Its steps are sized to cost at most {AUTO_SHARE:.0%} of the run, the settling counted as one "
        f"more candidate (counted in example passes, each step paying a fixed {STEP_OVERHEAD:g} examples' worth "
        f"whatever its size, plus the trainable share of {OPTIMIZER_OVERHEAD:g} for the optimizer's update); the "
        f"seconds it took are measured below.",
        f"- **Collapse**: a run that predicts one class (NLU) or one answer string (NLG) for at least "
        f"{COLLAPSE_SHARE:.0%} of the test set.",
        "- Costs are CPU seconds of the run's one thread (`time.process_time`): on a machine shared with other "
        "jobs wall seconds stretch with the load, CPU seconds much less.",
    ]
    metrics = {"nlu": [("accuracy", False, 100, 2, "accuracy %")],
               "nlg": [("accuracy", False, 100, 2, "exact match %"), ("eval_loss", True, 1, 4, "completion loss")]}
    for n, (wl, title) in enumerate(WORKLOADS.items(), start=1):
        methods = mode.nlu_methods if wl == "nlu" else mode.nlg_methods
        cells = Cells([r for r in records if r["workload"] == wl])
        out += ["", f"## {n}. {title}", ""]
        for key, lower, scale, digits, name in metrics[wl]:
            out += [f"### {name}: each method at its grid-best lr and with auto", "",
                    main_table(cells, methods, key, lower, scale, digits), "",
                    f"### {name}: GoRA against every method", "", gora_vs(cells, methods, key, lower, scale, digits),
                    "", f"### {name}: the whole grid", "", grid_table(cells, methods, key, scale, digits), ""]
            png = plot(cells, methods, key, name, mode.results / f"{wl}_{key}_vs_lr.png")
            if png is not None:
                out += [f"![{name} vs lr]({png.name})", ""]
        out += ["### Cost of auto", "", cost_table(cells, methods), "",
                "### Does the best lr follow the curvature?", "",
                "lambda_max: the largest eigenvalue of the training loss's Hessian along the method's trainable "
                "parameters at its start, each tensor scaled by its lr multiplier (`M^1/2 H M^1/2`, M: LoRA+'s / "
                "GoRA's B/A ratio before any cap), by power iteration with Hessian-vector products on 2 training "
                "batches of 8 (`gorafit.lr_finder.hessian_top_eigenvalue`). If the best lr followed 1/lambda_max, "
                "'best lr x lambda_max' would be about constant across methods.", "",
                curvature_table(mode, wl, cells, methods), ""]
    if mode.serving_nlu:
        out += ["## Quality vs serving cost (GoRA's largest rank, compression at export, LoRA r=8)", "",
                serving_section(mode, records), ""]
    reference = done_records(MODES["quick"]) if mode.name != "quick" else records
    out += ["## Sizing: what the rest of the grid costs", "", sizing(mode, records, reference), "",
            "To continue (resumable: done runs are skipped; two one-thread workers share the grid by a hash of "
            "the run id; the report can be rebuilt at any time):", "", "```",
            f"OMP_NUM_THREADS=1 nice -n 5 python benchmarks/quality/run.py --mode {mode.name} --shard 0/2 &",
            f"OMP_NUM_THREADS=1 nice -n 5 python benchmarks/quality/run.py --mode {mode.name} --shard 1/2",
            f"python benchmarks/quality/run.py --mode {mode.name} --report-only", "```", ""]
    path = mode.results / "REPORT.md"
    write_text_atomic(path, "\n".join(out) + "\n")
    return path
