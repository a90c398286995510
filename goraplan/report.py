"""Human-readable views of a plan: summary, per-module table, rank distribution per module type, diff, plot.

Every string in a plan came from whoever built it: each line goes through `printable` before it is
returned, so a model or module name cannot move the cursor, clear the screen or forge a line.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from goraplan.allocate import SERVING_RANKS, padded_parameters, serving_rank
from goraplan.errors import GoraError
from goraplan.files import atomic_file, check_can_write
from goraplan.plan import Plan
from goraplan.targets import module_type
from goraplan.untrusted import printable


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
        f"model      {printable(man.base_model.name_or_path)}"
        + (f" at revision {printable(man.base_model.revision)}" if man.base_model.revision else "")
        + f" ({printable(man.base_model.architecture)}, {printable(man.base_model.dtype)}), task {man.task}",
        f"data       {man.calibration.source} [{man.calibration.split}]: {man.calibration.steps} steps, "
        f"{man.calibration.examples} examples, {man.calibration.tokens} tokens, base loss {man.calibration.mean_loss:.4f}",
        f"settings   r0={s.rank} ranks {s.min_rank}..{s.max_rank} alpha={s.alpha:g} gamma={man.step_size:g}"
        f"{' (auto)' if man.step_size_search else ''} "
        f"importance={s.importance} allocation={s.allocation} seed={s.seed}",
        f"modules    {len(ranks)}, ranks {min(ranks)}..{max(ranks)} (mean {statistics.mean(ranks):.2f})",
        f"params     {t.allocated:,} allocated of a {t.budget:,} budget (plain LoRA r={s.rank}: "
        f"{t.lora_equivalent:,}; ratio {t.ratio:.4f})",
    ]
    lines.append(_serving_line(man.modules, s.serve_rank, t.allocated))
    if man.ranks_from:
        rf = man.ranks_from
        lines.append(f"ranks from {printable(rf.source)} (sha256 {rf.plan_sha256[:16]}, allocated on "
                     f"{printable(rf.calibration_source)}); importance and init from this plan's data")
    if man.step_size_search:
        ss = man.step_size_search
        tried = ", ".join(f"{g}: {'inf' if v is None else f'{v:.4f}'}" for g, v in ss.losses.items())
        lines.append(f"step size  chose {ss.chosen:g} on {ss.held_out_batches} held-out batches "
                     f"(base loss {ss.base_loss:.4f}; {tried})")
    return _inert(lines)


def _serving_line(modules, serve_rank: int | None, allocated: int) -> str:
    """The vLLM ``--max-lora-rank`` this plan is served at, and what padding every module to it costs."""
    largest = max(m.rank for m in modules)
    bucket = serve_rank or serving_rank(largest)
    if bucket is None:
        return f"serving    largest rank {largest} is above {SERVING_RANKS[-1]}, the largest --max-lora-rank vLLM accepts"
    padded = padded_parameters({m.name: sum(m.shape) for m in modules}, bucket)
    why = "set by --serve-rank" if serve_rank else f"the smallest holding rank {largest}"
    return (f"serving    vLLM --max-lora-rank {bucket} ({why}): every module padded to rank {bucket}, "
            f"{padded:,} params per adapter = {padded / allocated:.2f}x allocated (throughput and LoRA memory "
            f"follow this bucket, not the budget)")


def type_table_lines(plan: Plan) -> list[str]:
    rows = ["module type              n   min  mean   max  ranks by layer"]
    for kind, ranks in ranks_by_type(plan).items():
        rows.append(
            f"{printable(kind):<22} {len(ranks):>3} {min(ranks):>5} {statistics.mean(ranks):>5.1f} {max(ranks):>5}  "
            + " ".join(str(r) for r in ranks)
        )
    return _inert(rows)


def module_table_lines(plan: Plan) -> list[str]:
    rows = [f"{'module':<48} {'shape':>11} {'rank':>4} {'share':>7} {'importance':>11} {'params':>8}"]
    for m in plan.manifest.modules:
        shape = f"{m.shape[0]}x{m.shape[1]}"
        rows.append(f"{printable(m.name):<48} {shape:>11} {m.rank:>4} {m.share:>7.4f} {m.importance:>11.4e} "
                    f"{m.params:>8}")
    return _inert(rows)


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
    if ma.ranks_from and ma.ranks_from.plan_sha256 == b.sha256:
        out.append("ranks: the first plan reuses the second plan's ranks (goraplan build --ranks-from)")
    if mb.ranks_from and mb.ranks_from.plan_sha256 == a.sha256:
        out.append("ranks: the second plan reuses the first plan's ranks (goraplan build --ranks-from)")
    if len(common) > 1:
        share_a, share_b = [_share(a, n) for n in common], [_share(b, n) for n in common]
        rho = rank_correlation(share_a, share_b)
        rho = 1.0 if rho is None else rho  # a constant order agrees with itself
        out.append(f"importance order: Spearman rank correlation {rho:.4f} over {len(common)} shared modules")
        k = max(1, len(common) // 4)
        shared_top = top_k_overlap(share_a, share_b, k)
        out.append(f"importance order: {shared_top} of the top {k} modules are the same in both plans "
                   f"({shared_top / k:.0%})")
    out.append(f"totals: {ma.totals.allocated:,} vs {mb.totals.allocated:,} parameters")
    return _inert(out)


def _inert(lines: list[str]) -> list[str]:
    """Each line with any control character that a plan's strings brought in escaped."""
    return [printable(line) for line in lines]


def top_k_overlap(x: list[float], y: list[float], k: int) -> int:
    """How many of the `k` highest entries of `x` are also among the `k` highest of `y` (same positions).

    >>> top_k_overlap([0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], 2)
    1
    """
    def top(v: list[float]) -> set[int]:
        return set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])

    return len(top(x) & top(y))


def _share(plan: Plan, name: str) -> float:
    return next(m.share for m in plan.manifest.modules if m.name == name)


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (no ties expected); None when either side is constant.

    >>> rank_correlation([1, 2, 3, 4], [10, 30, 20, 40])
    0.8
    """

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
    return cov / var if var else None


PLOT_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp", "tif", "tiff")


def check_plot_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """One sentence before any work if the rank chart cannot be written at `path`.

    The format comes from the extension, which must be an image format, and the chart never replaces an
    input (an existing image is replaced: a chart is cheap to draw again).

    >>> check_plot_path("ranks.gora")
    Traceback (most recent call last):
    goraplan.errors.GoraError: --plot ranks.gora: the chart's format comes from the file extension; use .png, .svg, .pdf, .jpg, .jpeg, .webp, .tif or .tiff.
    """
    path = Path(path)
    if path.suffix.lower().lstrip(".") not in PLOT_FORMATS:
        formats = ", ".join(f".{f}" for f in PLOT_FORMATS)
        raise GoraError(f"--plot {printable(path)}: the chart's format comes from the file extension; use "
                        f"{formats.rsplit(', ', 1)[0]} or {formats.rsplit(', ', 1)[1]}.")
    return check_can_write(path, overwrite=True, inputs=inputs)


def plot_ranks(plan: Plan, path: str | os.PathLike) -> None:
    """Rank per layer, one line per module type (the paper's Figure 3), saved atomically as an image."""
    path = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, ranks in ranks_by_type(plan).items():
        ax.plot(range(len(ranks)), ranks, marker="o", markersize=3, label=_plot_text(kind))
    s = plan.manifest.settings
    ax.axhline(s.rank, color="grey", linestyle="--", linewidth=1, label=f"plain LoRA r={s.rank}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("rank")
    ax.set_title(f"GoRA ranks: {_plot_text(plan.manifest.base_model.name_or_path)} "
                 f"({plan.manifest.totals.allocated:,} / {plan.manifest.totals.budget:,} params)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lower().lstrip("."))
    plt.close(fig)


def _plot_text(text: str) -> str:
    """A plan's string as matplotlib shows it literally: escaped, and ``$`` not opening mathtext."""
    return printable(text).replace("$", r"\$")
