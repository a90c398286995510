"""Human-readable views of a plan: summary, per-module table, rank distribution per module type, diff, plot."""

from __future__ import annotations

import statistics
from collections import defaultdict

from goraplan.plan import Plan
from goraplan.targets import module_type


def ranks_by_type(plan: Plan) -> dict[str, list[int]]:
    """Module type (``self_attn.q_proj``) -> ranks in model order (the paper's Figure 3)."""
    out: dict[str, list[int]] = defaultdict(list)
    for m in plan.manifest.modules:
        out[module_type(m.name)].append(m.rank)
    return dict(out)


def summary_lines(plan: Plan) -> list[str]:
    man = plan.manifest
    ranks = [m.rank for m in man.modules]
    s = man.settings
    t = man.totals
    lines = [
        f"plan       {plan.sha256 or '(unsaved)'}",
        f"model      {man.base_model.name_or_path} ({man.base_model.architecture}, {man.base_model.dtype}), task {man.task}",
        f"data       {man.calibration.source} [{man.calibration.split}]: {man.calibration.steps} steps, "
        f"{man.calibration.examples} examples, {man.calibration.tokens} tokens, base loss {man.calibration.mean_loss:.4f}",
        f"settings   r0={s.rank} ranks {s.min_rank}..{s.max_rank} alpha={s.alpha:g} gamma={man.step_size:g}"
        f"{' (auto)' if man.step_size_search else ''} "
        f"importance={s.importance} allocation={s.allocation} seed={s.seed}",
        f"modules    {len(ranks)}, ranks {min(ranks)}..{max(ranks)} (mean {statistics.mean(ranks):.2f})",
        f"params     {t.allocated:,} allocated of a {t.budget:,} budget (plain LoRA r={s.rank}: "
        f"{t.lora_equivalent:,}; ratio {t.ratio:.4f})",
    ]
    if man.step_size_search:
        ss = man.step_size_search
        tried = ", ".join(f"{g}: {'inf' if v is None else f'{v:.4f}'}" for g, v in ss.losses.items())
        lines.append(f"step size  chose {ss.chosen:g} on {ss.held_out_batches} held-out batches "
                     f"(base loss {ss.base_loss:.4f}; {tried})")
    return lines


def type_table_lines(plan: Plan) -> list[str]:
    rows = ["module type              n   min  mean   max  ranks by layer"]
    for kind, ranks in ranks_by_type(plan).items():
        rows.append(
            f"{kind:<22} {len(ranks):>3} {min(ranks):>5} {statistics.mean(ranks):>5.1f} {max(ranks):>5}  "
            + " ".join(str(r) for r in ranks)
        )
    return rows


def module_table_lines(plan: Plan) -> list[str]:
    rows = [f"{'module':<48} {'shape':>11} {'rank':>4} {'share':>7} {'importance':>11} {'params':>8}"]
    for m in plan.manifest.modules:
        shape = f"{m.shape[0]}x{m.shape[1]}"
        rows.append(f"{m.name:<48} {shape:>11} {m.rank:>4} {m.share:>7.4f} {m.importance:>11.4e} {m.params:>8}")
    return rows


def diff_lines(a: Plan, b: Plan) -> list[str]:
    """What two plans disagree on: base model, settings, modules, ranks, importance order."""
    out: list[str] = []
    ma, mb = a.manifest, b.manifest
    if ma.base_model.fingerprint != mb.base_model.fingerprint:
        out.append(f"base model: {ma.base_model.name_or_path} ({ma.base_model.fingerprint[:19]}) vs "
                   f"{mb.base_model.name_or_path} ({mb.base_model.fingerprint[:19]})")
    if ma.calibration.token_fingerprint != mb.calibration.token_fingerprint:
        out.append(f"calibration data: {ma.calibration.source} vs {mb.calibration.source} (different tokens)")
    sa, sb = ma.settings.model_dump(), mb.settings.model_dump()
    for key in sa:
        if sa[key] != sb[key]:
            out.append(f"setting {key}: {sa[key]} vs {sb[key]}")
    ra, rb = a.ranks, b.ranks
    only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
    if only_a:
        out.append(f"only in the first plan: {len(only_a)} modules, e.g. {only_a[0]}")
    if only_b:
        out.append(f"only in the second plan: {len(only_b)} modules, e.g. {only_b[0]}")
    common = [n for n in ra if n in rb]
    changed = [n for n in common if ra[n] != rb[n]]
    if changed:
        out.append(f"ranks differ in {len(changed)} of {len(common)} shared modules:")
        out.extend(f"  {n}: {ra[n]} -> {rb[n]}" for n in changed[:20])
        if len(changed) > 20:
            out.append(f"  ... and {len(changed) - 20} more")
    if len(common) > 1:
        rho = _spearman([_share(a, n) for n in common], [_share(b, n) for n in common])
        out.append(f"importance order: Spearman rank correlation {rho:.4f} over {len(common)} shared modules")
    out.append(f"totals: {ma.totals.allocated:,} vs {mb.totals.allocated:,} parameters")
    return out


def _share(plan: Plan, name: str) -> float:
    return next(m.share for m in plan.manifest.modules if m.name == name)


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 1.0


def plot_ranks(plan: Plan, path: str) -> None:
    """Rank per layer, one line per module type (the paper's Figure 3), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, ranks in ranks_by_type(plan).items():
        ax.plot(range(len(ranks)), ranks, marker="o", markersize=3, label=kind)
    s = plan.manifest.settings
    ax.axhline(s.rank, color="grey", linestyle="--", linewidth=1, label=f"plain LoRA r={s.rank}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("rank")
    ax.set_title(f"GoRA ranks: {plan.manifest.base_model.name_or_path} "
                 f"({plan.manifest.totals.allocated:,} / {plan.manifest.totals.budget:,} params)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
