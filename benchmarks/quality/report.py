"""Tables and charts of the quality benchmark, rebuilt from the run files (see run.py).

Everything here reads ``<results>/runs/*.json`` and writes ``<results>/REPORT.md`` plus PNG charts;
nothing is typed in by hand. Statistics: mean and sample standard deviation over seeds; a margin
between two methods is the difference of their means ± its standard error
``sqrt(s1^2/n1 + s2^2/n2)`` (0 when each has one seed).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.quality.harness import (
    COLLAPSE_SHARE,
    LORA_ALPHA,
    LORA_RANK,
    MAX_GRAD_NORM,
    WARMUP_RATIO,
    WEIGHT_DECAY,
)

# Display names, in table order.
METHOD_NAMES = {
    "base": "pretrained, no training",
    "full": "Full fine-tuning",
    "lora": "LoRA r=8",
    "rslora": "rsLoRA r=8",
    "loraplus": "LoRA+ r=8 (ratio 16)",
    "pissa": "PiSSA r=8 (PEFT)",
    "loraga": "LoRA-GA r=8 (PEFT)",
    "adalora": "AdaLoRA 12->8 (PEFT)",
    "gora-fixed-x16": "GoRA fixed ranks 8, B/A x16",
    "gora-fixed-x1": "GoRA fixed ranks 8, B/A x1",
    "gora-x16": "GoRA 4-32, B/A x16 (paper)",
    "gora-x1": "GoRA 4-32, B/A x1",
    "gora-x4": "GoRA 4-32, B/A x4",
    "gora-x16-n24": "GoRA 4-32, B/A x16 (paper), N=24",
    "gora-x1-n24": "GoRA 4-32, B/A x1, N=24",
    "gora-x16-bmax0.005": "GoRA 4-32, B/A x16, B lr <= 5e-3",
    "gora-x16-bmax0.003": "GoRA 4-32, B/A x16, B lr <= 3e-3 (gorafit default)",
    "gora-x16-n24-bmax0.005": "GoRA 4-32, B/A x16, B lr <= 5e-3, N=24",
    "gora-x16-n24-bmax0.003": "GoRA 4-32, B/A x16, B lr <= 3e-3 (gorafit default), N=24",
    "gora-x16-gauto": "GoRA 4-32, B/A x16, gamma auto",
    "gora-x1-gauto": "GoRA 4-32, B/A x1, gamma auto",
    "gora-x16-gauto-n20": "GoRA 4-32, B/A x16, gamma auto, N=20+4",
    "gora-x1-gauto-n20": "GoRA 4-32, B/A x1, gamma auto, N=20+4",
}
BASELINES = ("lora", "rslora", "loraplus", "pissa", "loraga", "adalora")  # "the best other method" among these


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ms(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{_pct(m)} ± {_pct(s)}"


def _margin(a: list[float], b: list[float]) -> str:
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return f"{100 * (ma - mb):+.2f} ± {100 * se:.2f}"


def _name(label: str) -> str:
    return METHOD_NAMES.get(label, label)


def _order(label: str) -> int:
    keys = list(METHOD_NAMES)
    return keys.index(label) if label in keys else len(keys)


# ---------------------------------------------------------------------------------------------------- grouping
class Cells:
    """Runs grouped by (label, lr): accuracies, collapse flags and the records themselves."""

    def __init__(self, records: list[dict]):
        self.runs: dict[tuple[str, float], list[dict]] = defaultdict(list)
        for r in records:
            self.runs[(r["label"], r["spec"]["lr"])].append(r)

    def labels(self) -> list[str]:
        return sorted({k[0] for k in self.runs}, key=_order)

    def lrs(self) -> list[float]:
        return sorted({k[1] for k in self.runs})

    def acc(self, label: str, lr: float) -> list[float]:
        return [r["accuracy"] for r in self.runs.get((label, lr), [])]

    def best_lr(self, label: str) -> float | None:
        """The lr with the best mean accuracy (the lower lr on a tie)."""
        options = [(lr, mean_std(self.acc(label, lr))[0]) for lr in self.lrs() if self.acc(label, lr)]
        if not options:
            return None
        return max(options, key=lambda o: (round(o[1], 6), -o[0]))[0]

    def collapsed(self, label: str, lr: float | None = None) -> tuple[int, int]:
        runs = [r for (lab, x), rs in self.runs.items() if lab == label and (lr is None or x == lr) for r in rs]
        return sum(r["collapsed"] for r in runs), len(runs)

    def field(self, label: str, lr: float, key: str) -> list:
        return [r.get(key) for r in self.runs.get((label, lr), [])]


# ---------------------------------------------------------------------------------------------------- tables
def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _params(cells: Cells, label: str, lr: float) -> str:
    values = [v for v in cells.field(label, lr, "trainable_params") if v is not None]
    return f"{values[0]:,}" if values else "-"


def _seconds(cells: Cells, label: str, lr: float, key: str) -> str:
    values = [v for v in cells.field(label, lr, key) if v is not None]
    return f"{statistics.fmean(values):.0f}" if values else "-"


def table_at_lr(cells: Cells, lr: float) -> str:
    rows = []
    for label in cells.labels():
        accs = cells.acc(label, lr)
        if label == "base":
            lr_base = cells.lrs()[0]
            accs = cells.acc(label, lr_base)
        if not accs:
            rows.append([_name(label), "-", 0, "-", "-"])
            continue
        c, n = cells.collapsed(label, lr if label != "base" else None)
        rows.append([_name(label), _ms(accs), len(accs), f"{c}/{n}", _params(cells, label, lr if label != "base" else cells.lrs()[0])])
    return _table(["method", "accuracy % (mean ± std)", "seeds", "collapsed", "trainable params"], rows)


def table_best(cells: Cells) -> str:
    rows = []
    for label in cells.labels():
        lr = cells.best_lr(label)
        if lr is None:
            continue
        accs = cells.acc(label, lr)
        c, n = cells.collapsed(label, lr)
        ca, na = cells.collapsed(label)
        rows.append([_name(label), f"{lr:g}" if label != "base" else "-", _ms(accs), len(accs),
                     _params(cells, label, lr), _seconds(cells, label, lr, "train_s"),
                     _seconds(cells, label, lr, "setup_s"), f"{c}/{n}", f"{ca}/{na}"])
    return _table(["method", "best lr", "accuracy % (mean ± std)", "seeds", "trainable params", "train s",
                   "setup s (plan / init)", "collapsed at best lr", "collapsed, all lrs"], rows)


def table_grid(cells: Cells) -> str:
    lrs = [lr for lr in cells.lrs() if lr > 0]
    rows = []
    for label in cells.labels():
        if label == "base":
            continue
        row = [_name(label)]
        for lr in lrs:
            accs = cells.acc(label, lr)
            c, n = cells.collapsed(label, lr)
            row.append(f"{_ms(accs)} ({len(accs)}s{', ' + str(c) + ' coll.' if c else ''})" if accs else "-")
        rows.append(row)
    return _table(["method"] + [f"lr {lr:g}" for lr in lrs], rows)


def margins(cells: Cells, gora_labels: list[str], lr_fixed: float | None) -> str:
    """GoRA's margin over LoRA, over the best other PEFT method and over full FT: at one lr or each one's best."""
    rows = []

    def pick(label: str) -> tuple[float | None, list[float]]:
        lr = lr_fixed if lr_fixed is not None else cells.best_lr(label)
        return lr, (cells.acc(label, lr) if lr is not None else [])

    others = [(lab, *pick(lab)) for lab in BASELINES if pick(lab)[1]]
    best_other = max(others, key=lambda o: mean_std(o[2])[0]) if others else None
    lora, full = pick("lora"), pick("full")
    for g in gora_labels:
        g_lr, g_acc = pick(g)
        if not g_acc:
            continue
        row = [_name(g) + (f" (lr {g_lr:g})" if lr_fixed is None else "")]
        row.append(_margin(g_acc, lora[1]) + (f" (LoRA lr {lora[0]:g})" if lr_fixed is None else "") if lora[1] else "-")
        if best_other:
            row.append(f"{_margin(g_acc, best_other[2])} vs {_name(best_other[0])}"
                       + (f" (lr {best_other[1]:g})" if lr_fixed is None else ""))
        else:
            row.append("-")
        row.append(_margin(g_acc, full[1]) + (f" (full FT lr {full[0]:g})" if lr_fixed is None else "") if full[1] else "-")
        rows.append(row)
    return _table(["GoRA variant", "vs LoRA (points)", "vs best other PEFT method (points)", "vs full FT (points)"], rows)


# ---------------------------------------------------------------------------------------------------- charts
def _footer(fig, stamp: dict) -> None:
    v = stamp["versions"]
    fig.text(0.01, 0.005, f"{stamp['command']} | torch {v.get('torch')}, transformers {v.get('transformers')}, "
             f"peft {v.get('peft')} | {stamp['machine'][:60]} | {stamp['date']}", fontsize=6, color="0.4")


def plot_lr(cells: Cells, path: Path, title: str, ylabel: str, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    colors = plt.get_cmap("tab20").colors
    for i, label in enumerate(cells.labels()):
        lrs = [lr for lr in cells.lrs() if cells.acc(label, lr)]
        if label == "base":
            ax.axhline(100 * mean_std(cells.acc(label, lrs[0]))[0], color="0.5", ls=":", label=_name(label))
            continue
        means = [100 * mean_std(cells.acc(label, lr))[0] for lr in lrs]
        lo = [100 * min(cells.acc(label, lr)) for lr in lrs]
        hi = [100 * max(cells.acc(label, lr)) for lr in lrs]
        color = colors[(2 * i) % 20 + (2 * i // 20) % 2]
        style = "--" if label.startswith("gora") else "-"
        ax.plot(lrs, means, style, marker="o", color=color, label=_name(label), lw=2 if label.startswith("gora") else 1.3)
        ax.fill_between(lrs, lo, hi, color=color, alpha=0.12)
        for lr in lrs:
            ax.scatter([lr] * len(cells.acc(label, lr)), [100 * a for a in cells.acc(label, lr)], s=8, color=color, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (of lora_A / of all weights for full FT)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\nline: mean over seeds; band: min-max over seeds; dots: single seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _footer(fig, stamp)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablations(groups: dict[str, list[tuple[str, list[float], int]]], path: Path, title: str, stamp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 4.2), sharey=True)
    axes = [axes] if n == 1 else axes
    for ax, (knob, rows) in zip(axes, groups.items(), strict=True):
        names = [r[0] for r in rows]
        means = [100 * mean_std(r[1])[0] if r[1] else 0 for r in rows]
        stds = [100 * mean_std(r[1])[1] if r[1] else 0 for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color="tab:blue", alpha=0.7, capsize=3)
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r[1]), [100 * a for a in r[1]], s=10, color="k", zorder=3)
            if r[2]:
                ax.text(i, 1, f"{r[2]} coll.", ha="center", fontsize=7, color="tab:red")
        ax.set_xticks(range(len(rows)), names, rotation=30, fontsize=7, ha="right")
        ax.set_title(knob, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    lo = min((100 * min(r[1]) for rows in groups.values() for r in rows if r[1]), default=50)
    axes[0].set_ylim(max(0, lo - 5), 100)
    fig.suptitle(title, fontsize=10)
    _footer(fig, stamp)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.28, top=0.86, wspace=0.08)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- collapse
def collapse_section(records: list[dict]) -> str:
    """Where runs collapse, and what distinguishes them (first loss, final loss, how far the adapter moved)."""
    nlu = [r for r in records if r["spec"]["workload"] == "nlu"]
    if not nlu:
        return "No NLU runs yet."
    by = defaultdict(list)
    for r in nlu:
        by[(r["label"], r["spec"]["lr"])].append(r)
    lrs = sorted({r["spec"]["lr"] for r in nlu})
    labels = sorted({r["label"] for r in nlu if any(x["collapsed"] for x in nlu if x["label"] == r["label"])}, key=_order)
    lines = []
    if labels:
        rows = [[_name(lab)] + [f"{sum(x['collapsed'] for x in by[(lab, lr)])}/{len(by[(lab, lr)])}" if by[(lab, lr)] else "-"
                                for lr in lrs] for lab in labels]
        lines.append("Collapsed / done, per lr (only configurations with at least one collapse; every NLU run, "
                     "main grid and ablations):\n\n" + _table(["configuration"] + [f"lr {lr:g}" for lr in lrs], rows))
    else:
        lines.append("No NLU run collapsed.")

    def describe(runs: list[dict]) -> list[str]:
        first = [r["train_loss_first"] for r in runs if r.get("train_loss_first") is not None]
        last = [r["train_loss_last10"] for r in runs if r.get("train_loss_last10") is not None]
        delta = [r["adapter_delta_ratio"] for r in runs if r.get("adapter_delta_ratio") is not None]
        f = lambda v: f"{statistics.fmean(v):.3f}" if v else "-"  # noqa: E731
        return [str(len(runs)), f(first), f(last), f(delta), f([r["accuracy"] for r in runs])]

    rows = []
    low = lambda r: r["spec"]["lr"] < 1e-3  # noqa: E731
    # AdaLoRA's loss includes PEFT's orthogonality penalty, so it is left out of the loss columns.
    others = tuple(m for m in BASELINES if m != "adalora")
    groups = [
        ("GoRA (any), collapsed, lr < 1e-3", lambda r: r["spec"]["method"].startswith("gora") and r["collapsed"] and low(r)),
        ("GoRA (any), collapsed, lr >= 1e-3", lambda r: r["spec"]["method"].startswith("gora") and r["collapsed"] and not low(r)),
        ("GoRA (any), not collapsed", lambda r: r["spec"]["method"].startswith("gora") and not r["collapsed"]),
        ("other adapters, collapsed, lr < 1e-3", lambda r: r["spec"]["method"] in others and r["collapsed"] and low(r)),
        ("other adapters, collapsed, lr >= 1e-3", lambda r: r["spec"]["method"] in others and r["collapsed"] and not low(r)),
        ("other adapters, not collapsed", lambda r: r["spec"]["method"] in others and not r["collapsed"]),
        ("full FT, collapsed", lambda r: r["spec"]["method"] == "full" and r["collapsed"]),
        ("full FT, not collapsed", lambda r: r["spec"]["method"] == "full" and not r["collapsed"]),
    ]
    for name, pred in groups:
        runs = [r for r in nlu if pred(r)]
        if runs:
            rows.append([name] + describe(runs))
    lines.append("A collapse at a small lr is a model that has not yet moved off its new head's initial bias (the "
                 "loss stays near ln 2 = 0.693); a collapse at a large lr is a model that moved and lost its input. "
                 "What the runs look like (means): the first training loss (with the initial adapter), the "
                 "mean loss of the last 10 steps, and how far the adapter moved each weight, "
                 "mean over modules of ||s·B·A||_F / ||W||_F after training (not for full FT; AdaLoRA, whose "
                 "loss includes PEFT's orthogonality penalty, is left out):\n\n"
                 + _table(["runs", "n", "first loss", "last-10 loss", "adapter / weight norm", "accuracy"], rows))
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------------- probes
def probe_section(results: Path, mode) -> str:
    from benchmarks.quality.run import workload_config

    probes = []
    for path in sorted((results / "probes").glob("*.json")):
        p = json.loads(path.read_text())
        if p.get("workload_config") == workload_config(mode, p["workload"]):
            probes.append(p)
    if not probes:
        return "No probe yet (`--parts probe`)."
    gammas = [r["gamma"] for r in probes[0]["rows"]]
    header = ["gamma"] + [f"{p['case']}: calib / held-out loss" for p in probes]
    rows = []
    for i, g in enumerate(gammas):
        rows.append([f"{g:g}"] + [f"{p['rows'][i]['calib_loss']:.4f} / {p['rows'][i]['held_out_loss']:.4f}" for p in probes])
    notes = [f"- `{p['case']}`: N = {p['n_calib']} calibration batches of {p['calib_batch_size']}, K = {p['n_held_out']} "
             f"held-out batches (the next training examples in seed {p['seed']}'s order); head warmed first: "
             f"{p['warm_head']}; best held-out gamma {p['best_gamma_held_out']:g}, held-out loss "
             f"{p['held_out_gain_at_best']:+.4f} below gamma 0 there ({p['seconds']:.0f} s)." for p in probes]
    return ("Loss (eval mode) of the model with GoRA's initial adapter, B scaled to each gamma (gamma 0 = the base "
            "model), on (the first 8 of) the calibration batches the gradient came from and on held-out training "
            "batches. "
            "No training.\n\n" + _table(header, rows) + "\n\n" + "\n".join(notes))


# ---------------------------------------------------------------------------------------------------- report
def step_size_section(records: list[dict]) -> str:
    """What goraplan's --step-size auto chose per workload, and accuracy against the same GoRA at gamma 0.05."""
    rows = []
    for workload in ("nlu", "nlg"):
        runs = [r for r in records if r["spec"]["workload"] == workload and r["spec"].get("gamma") == "auto"
                and r["spec"]["group"] in ("main", "nlg")]
        cells = Cells([r for r in records if r["spec"]["workload"] == workload and r["spec"]["group"] in ("main", "nlg")])
        for label in sorted({r["label"] for r in runs}, key=_order):
            mine = [r for r in runs if r["label"] == label]
            searches = {r["spec"]["seed"]: r["method_info"]["step_size_search"] for r in mine}
            chosen = ", ".join(f"s{seed}: {s['chosen']:g}" for seed, s in sorted(searches.items()))
            gain = [s["losses"]["0.05"] - s["losses"][f"{s['chosen']:g}"] for s in searches.values()]
            fixed = label.replace("-gauto", "").replace("-n20", "-n24" if workload == "nlg" else "")
            lr_a, lr_f = cells.best_lr(label), cells.best_lr(fixed)
            if lr_a is None or lr_f is None:
                continue
            coll_a, n_a = cells.collapsed(label)
            coll_f, n_f = cells.collapsed(fixed)
            rows.append([workload, _name(label), chosen, f"{statistics.fmean(gain):+.4f}",
                         f"{_ms(cells.acc(label, lr_a))} (lr {lr_a:g})", f"{_ms(cells.acc(fixed, lr_f))} (lr {lr_f:g})",
                         _margin(cells.acc(label, lr_a), cells.acc(fixed, lr_f)), f"{coll_a}/{n_a} vs {coll_f}/{n_f}"])
    if not rows:
        return "No run with `--step-size auto` yet."
    return (
        "`goraplan build --step-size auto` scores gamma in {0.01, 0.02, 0.05, 0.1, 0.2, 0.3} by the mean loss on K = 4 "
        "training batches that follow the N gradient batches (eval mode, no training) and keeps the lowest. Compared "
        "with the same GoRA at the default gamma 0.05 (NLG: N = 20 gradient + 4 held-out batches against N = 24 "
        "gradient batches, the same 24 batches of data), each at its own best lr:\n\n"
        + _table(["workload", "method", "chosen gamma per seed", "held-out loss gain vs gamma 0.05",
                  "accuracy % (auto)", "accuracy % (gamma 0.05)", "auto - fixed (points)", "collapsed, all lrs"], rows)
    )


def write_report(mode, stamp: dict) -> Path:
    """Rebuild REPORT.md and the charts of `mode` (a run.Mode) from its run files."""
    from benchmarks.quality.harness import RunSpec
    from benchmarks.quality.run import (
        NLU_BASE_FALLBACK,
        _is_main,
        ablation_specs,
        fixed_ablation_base,
        planned,
        workload_config,
    )

    results = mode.results
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    stale = [r for r in records if r.get("workload_config") != workload_config(mode, r["workload"])]
    records = [r for r in records if r not in stale]
    chosen = fixed_ablation_base(mode, records, seeds_needed=1)
    base = chosen[0] if chosen else NLU_BASE_FALLBACK
    plan = planned(mode, records, base)
    have = {r["run_id"]: r for r in records}
    failures = []
    if (results / "failures.jsonl").is_file():
        failures = [json.loads(x) for x in (results / "failures.jsonl").read_text().splitlines() if x.strip()]

    by_part = defaultdict(lambda: [0, 0])
    for part, spec in plan:
        by_part[part][1] += 1
        by_part[part][0] += spec.run_id in have
    done_total = sum(v[0] for v in by_part.values())
    # an ablation run whose spec equals a part-1 method's (same knobs, lr and seed) is that method's run too
    nlu_main = [r for r in records if r["spec"]["workload"] == "nlu"
                and (r["spec"]["group"] == "main" or _is_main(mode, RunSpec(**{**r["spec"], "group": "main"})))]
    nlg = [r for r in records if r["spec"]["workload"] == "nlg"]
    v = stamp["versions"]
    out = [f"# GoRA against LoRA and its variants at the same budget ({mode.name} mode)", ""]
    out += [
        f"Generated by `{stamp['command']}` on {stamp['date']}; machine: {stamp['machine']}; python "
        f"{stamp['python']}; torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}, "
        f"datasets {v.get('datasets')}, goraplan {v.get('goraplan')}. Every number below is computed from the run "
        f"files in `runs/` (each carries its own command, versions, machine and date).",
        "",
        f"**Grid coverage: {done_total} of {len(plan)} planned runs done** ("
        + ", ".join(f"{part} {d}/{t}" for part, (d, t) in by_part.items()) + ")"
        + (f"; {len(failures)} runs failed (listed at the end)." if failures else "; no run failed.")
        + (f" {len(stale)} run files from other workload sizes are ignored." if stale else "")
        + (" Ablation runs are planned once the ablation base is chosen from part 1." if chosen is None else ""),
        "",
        "## Setup (the same for every method)",
        "",
    ]
    wl_desc = {r["workload"]: (r.get("workload_description"), r.get("workload_extra", {})) for r in records}
    for name, (desc, extra) in sorted(wl_desc.items()):
        out.append(f"- `{name}`: {desc}; model {extra.get('model')}; data `{extra.get('data')}`"
                   + (f"; score: {extra.get('score')}" if extra.get("score") else "; score: accuracy on the test split"))
    out += [
        f"- One epoch, AdamW (weight decay {WEIGHT_DECAY}), cosine schedule with {WARMUP_RATIO:.0%} warm-up, "
        f"gradient-norm clip {MAX_GRAD_NORM}, float32, one torch thread, the same batches in the same order "
        "for every method (the order depends on the seed only). The seed also draws the classification head "
        "and the random A matrices. The classification head trains in every method (PEFT `modules_to_save`).",
        f"- Adapters: rank r0 = {LORA_RANK}, alpha {LORA_ALPHA:g}, no dropout, the same explicit module list for "
        "every method (NLU: every linear layer of the encoder incl. the pooler, not the head; NLG: q/k/v/o). "
        "LoRA scales by alpha/r, rsLoRA and GoRA by alpha/sqrt(r). LoRA+ is `peft.optimizers.create_loraplus_optimizer` "
        "(ratio 16; it also puts every 1-d parameter, i.e. the head's bias, in the x16 group). PiSSA, LoRA-GA "
        "(`preprocess_loraga` on the same calibration batches as GoRA) and AdaLoRA (init_r 12 -> target_r 8, "
        "tinit 10%, tfinal 20%, `update_and_allocate` every step) are PEFT's implementations.",
        "- GoRA: `goraplan.build_plan` (importance `sensitivity`, step size gamma 0.05, N = 64 calibration batches "
        "of 8 from the start of the seed's training order unless a label says otherwise; budget = LoRA r=8's) "
        "and `gorafit.apply_plan`; B/A ratio x16 = every lora_B at 16x the lr (paper), x1 = one lr. "
        "GoRA's setup time (plan building) counts in 'setup s'.",
        f"- **Collapse**: a run that predicts the same class (NLU) or the same first answer token (NLG) for at "
        f"least {COLLAPSE_SHARE:.0%} of the held-out examples. The test split's majority class is "
        + ", ".join(f"{100 * r['gold_majority_share']:.1f}% ({r['workload']})"
                    for r in {r["workload"]: r for r in records}.values()) + ".",
        "- Best lr: the lr with the best mean accuracy over seeds, picked per method from the same grid. "
        "Margins: difference of means in accuracy points ± its standard error.",
        "- Times are wall seconds on a 2-core machine shared with other jobs: compare them loosely.",
        "",
    ]

    # ---- part 1
    out += ["## 1. NLU (paper Table 1 analogue): MiniLM-L6 on sarcasm headlines", ""]
    if nlu_main:
        cells = Cells(nlu_main)
        gora_labels = [lab for lab in cells.labels() if lab.startswith("gora")]
        plot_lr(cells, results / "nlu_accuracy_vs_lr.png", "NLU: MiniLM-L6, sarcasm headlines, one epoch",
                "test accuracy %", stamp)
        out += [f"### (a) Every method at lr {mode.lrs[0]:g} (the paper's setting)", "", table_at_lr(cells, mode.lrs[0]), "",
                "GoRA's margins at this lr:", "", margins(cells, gora_labels, mode.lrs[0]), "",
                "### (b) Every method at its own best lr", "", table_best(cells), "",
                "GoRA's margins, each method at its own best lr:", "", margins(cells, gora_labels, None), "",
                "### Whole grid (mean ± std over seeds, seeds done, collapsed runs)", "", table_grid(cells), "",
                "![accuracy vs lr](nlu_accuracy_vs_lr.png)", ""]
    else:
        out += ["No runs yet.", ""]

    # ---- part 2
    out += ["## 2. NLG (paper Table 2 analogue): SmolLM2-135M on sarcasm-lm, exact match", ""]
    if nlg:
        cells = Cells(nlg)
        gora_labels = [lab for lab in cells.labels() if lab.startswith("gora")]
        plot_lr(cells, results / "nlg_accuracy_vs_lr.png", "NLG: SmolLM2-135M, sarcasm-lm, exact match of the first answer token",
                "exact match %", stamp)
        out += ["### Every method at its own best lr", "", table_best(cells), "",
                "GoRA's margins, each method at its own best lr:", "", margins(cells, gora_labels, None), "",
                "### Whole grid", "", table_grid(cells), "", "![NLG accuracy vs lr](nlg_accuracy_vs_lr.png)", ""]
    else:
        out += ["No runs yet.", ""]

    # ---- part 3
    out += ["## 3. Ablations (paper Tables 3-5 analogue), NLU", ""]
    if chosen is None:
        out += ["The ablation base is chosen once part 1 has GoRA at every lr; not yet.", ""]
    else:
        out += [f"Base: {chosen[1]}; every other knob at its default (ranks 4-32, gamma 0.05, sensitivity, "
                f"N = 64, alpha 16). One knob varies at a time, same lr, seeds {mode.ablation_seeds}.", ""]
        groups: dict[str, list[tuple[str, list[float], int]]] = {}
        rows = []
        base_accs = [have[s.run_id]["accuracy"] for _, s in ablation_specs(mode, base, mode.ablation_seeds)
                     if s.run_id in have and s.label == base.label]
        for knob in mode.ablations:
            seen: dict[str, list[dict]] = {}
            for k, s in ablation_specs(mode, base, mode.ablation_seeds):
                if k == knob:
                    seen.setdefault(s.label, [])
                    if s.run_id in have:
                        seen[s.label].append(have[s.run_id])
            groups[knob] = []
            for label, runs in seen.items():
                accs = [r["accuracy"] for r in runs]
                coll = sum(r["collapsed"] for r in runs)
                groups[knob].append((label.replace("gora-", "").replace("fixed-", "8-8 "), accs, coll))
                is_base = label == base.label
                rows.append([knob, label + (" (base)" if is_base else ""), _ms(accs) if accs else "-", len(accs),
                             f"{coll}/{len(runs)}", _margin(accs, base_accs) if accs and base_accs and not is_base else "-"])
        out += [_table(["knob", "configuration", "accuracy % (mean ± std)", "seeds", "collapsed", "vs base (points)"], rows), ""]
        if any(g[1] for rows_ in groups.values() for g in rows_):
            plot_ablations(groups, results / "ablations.png", f"GoRA ablations, NLU, lr {base.lr:g}", stamp)
            out += ["![ablations](ablations.png)", ""]

    # ---- collapse
    out += ["## 4. What makes a run collapse", "", collapse_section(records), ""]
    out += ["## 5. Step-size probe: does GoRA's initial adapter lower the loss?", "", probe_section(results, mode), ""]
    out += ["## 6. The fix for a mis-set step size: `--step-size auto`", "", step_size_section(records), ""]
    if failures:
        out += ["## Failed runs", "", _table(["run", "error"], [[f["run_id"], f["error"][:200]] for f in failures]), ""]
    path = results / "REPORT.md"
    path.write_text("\n".join(out) + "\n")
    return path
