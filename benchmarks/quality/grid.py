"""What the quality benchmark runs: the run identity, the methods, their lr windows, the modes and the order.

Plain data and pure functions: no torch, no model. `executor.py` runs what `planned` lists,
`report.py` groups the run files by the same identities.

The lr lattice is quarter-decades (``10^(k/4)``: neighbours 1.78x apart, under the 2x the issue asks
for), and each method gets the 9 lattice points of a two-decade window around where it trains; the
range test of ``--lr auto`` (`gorafit.lr_finder`) walks the same lattice from 1e-3, so every lr that
auto picks inside a method's window is also a grid cell of that method.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "quality"

LORA_RANK = 8  # r0: plain LoRA's rank, the parameter budget every adapter method gets
LORA_ALPHA = 16.0  # the same alpha for every adapter method
AUTO = "auto"  # RunSpec.lr for a run whose lr comes from gorafit.lr_finder


def lattice(lo_exp4: int, points: int = 9) -> list[float]:
    """``points`` quarter-decade learning rates from ``10^(lo_exp4/4)``, rounded to 3 significant digits.

    >>> lattice(-16)
    [0.0001, 0.000178, 0.000316, 0.000562, 0.001, 0.00178, 0.00316, 0.00562, 0.01]
    """
    return [float(f"{10 ** ((lo_exp4 + k) / 4):.3g}") for k in range(points)]


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies one run: one method at one lr (or ``"auto"``) and one seed.

    >>> RunSpec("nlu", "gora", 1e-3, 0, ratio=1.0).run_id
    'nlu-gora-x1-lr0.001-s0'
    >>> RunSpec("nlg", "lora", "auto", 1).run_id
    'nlg-lora-lrauto-s1'
    """

    workload: str  # "nlu" | "nlg" | a test workload
    method: str  # a key of harness.METHODS
    lr: float | str
    seed: int
    # GoRA only
    min_rank: int = 4
    max_rank: int = 32
    ratio: float = 16.0  # lr of every lora_B / lr of every lora_A
    gamma: float | str = 0.05  # GoRA's step size
    n_calib: int = 64  # N: calibration batches (GoRA, LoRA-GA)
    b_lr_max: float | None = None  # gorafit's --lr-b-max: lora_B's lr capped (not below lr); None: no cap
    compress_to: int | None = None  # after training, lower every rank above it by truncated SVD (gorafit export --max-rank)
    head_lr: str | None = None  # "b": a new classification head trains at lora_B's (capped) lr; None: at the lr

    @property
    def label(self) -> str:
        """The method with every knob that differs from its default, e.g. ``gora-x1``."""
        if not self.method.startswith("gora"):
            return self.method
        base = RunSpec(self.workload, self.method, self.lr, self.seed)
        parts = [self.method, f"x{self.ratio:g}"]
        if (self.min_rank, self.max_rank) != (base.min_rank, base.max_rank):
            parts.append(f"r{self.min_rank}-{self.max_rank}")
        if self.gamma != base.gamma:
            parts.append(f"g{self.gamma}" if isinstance(self.gamma, str) else f"g{self.gamma:g}")
        if self.n_calib != base.n_calib:
            parts.append(f"n{self.n_calib}")
        if self.b_lr_max is not None:
            parts.append(f"bmax{self.b_lr_max:g}")
        if self.compress_to is not None:
            parts.append(f"c{self.compress_to}")
        if self.head_lr is not None:
            parts.append(f"head{self.head_lr}")
        return "-".join(parts)

    @property
    def auto(self) -> bool:
        return self.lr == AUTO

    @property
    def run_id(self) -> str:
        lr = self.lr if self.auto else f"{self.lr:g}"
        return f"{self.workload}-{self.label}-lr{lr}-s{self.seed}"


def _gorafit_b_lr_max() -> float | None:
    """gorafit's default cap on lora_B's lr (GoRA 'with gorafit's defaults')."""
    from gorafit.optim import LR_B_MAX_DEFAULT

    return LR_B_MAX_DEFAULT


def _gorafit_max_rank() -> int:
    """goraplan's default largest rank at r0 = LORA_RANK (GoRA 'with gorafit's defaults')."""
    from goraplan.settings import PlanSettings

    return PlanSettings(rank=LORA_RANK).resolved().max_rank


@dataclass(frozen=True)
class Method:
    """A method of the comparison: its template spec (lr and seed filled per point) and its lr window."""

    key: str  # the report's row key (= the spec's label)
    name: str  # the report's display name
    template: RunSpec
    lrs: list[float]


def methods(workload: str, n_calib: int) -> list[Method]:
    """The eight methods of the issue, each with a two-decade window around where it trains, and one ablation:
    GoRA with gorafit's defaults but the paper's largest rank (4 r0), gorafit's default before 2026-11-30."""
    cap, r_max = _gorafit_b_lr_max(), _gorafit_max_rank()

    def t(method: str, **kw) -> RunSpec:
        return RunSpec(workload, method, 0.0, 0, n_calib=n_calib, **kw)

    out = [
        ("full", "Full fine-tuning", t("full"), lattice(-20)),  # 1e-5 .. 1e-3
        ("lora", "LoRA r=8", t("lora"), lattice(-16)),  # 1e-4 .. 1e-2
        ("rslora", "rsLoRA r=8", t("rslora"), lattice(-16)),
        ("loraplus", "LoRA+ r=8 (ratio 16)", t("loraplus"), lattice(-18)),  # 3.16e-5 .. 3.16e-3
        ("pissa", "PiSSA r=8", t("pissa"), lattice(-16)),
        ("loraga", "LoRA-GA r=8", t("loraga"), lattice(-16)),
        (None, f"GoRA, gorafit defaults (x16, B lr <= {cap:g}, r_max {r_max})", t("gora", b_lr_max=cap, max_rank=r_max),
         lattice(-18)),
        (None, f"GoRA, gorafit defaults but r_max {4 * LORA_RANK} (the paper's)",
         t("gora", b_lr_max=cap, max_rank=4 * LORA_RANK), lattice(-18)),
        (None, "GoRA x1", t("gora", ratio=1.0), lattice(-16)),
    ]
    return [Method(key or spec.label, name, spec, lrs) for key, name, spec, lrs in out]


def serving_arms(workload: str, n_calib: int) -> list[Method]:
    """The serving-cost question's arms (what vLLM pads an adapter to is its largest rank): LoRA r=8 and GoRA with
    gorafit's defaults at r_max 32, 16 and 8, and r_max 32 compressed to 16 at export. Each gets the three lattice
    points around where its family trained best in the main grid (seed 0); GoRA's variants share one window."""
    cap = _gorafit_b_lr_max()

    def gora(**kw) -> RunSpec:
        return RunSpec(workload, "gora", 0.0, 0, n_calib=n_calib, b_lr_max=cap, **kw)

    # around the first seed's grid-best (NLU: GoRA with gorafit's defaults 1e-3, LoRA 1.78e-3)
    gora_lrs, lora_lrs = lattice(-13, 3), lattice(-12, 3)  # 5.62e-4 .. 1.78e-3; 1e-3 .. 3.16e-3
    arms = [("LoRA r=8 (serves at 8)", RunSpec(workload, "lora", 0.0, 0, n_calib=n_calib), lora_lrs),
            ("GoRA r_max 32 (serves at 32)", gora(), gora_lrs),
            ("GoRA r_max 16 (serves at 16)", gora(max_rank=16), gora_lrs),
            ("GoRA r_max 8 (serves at 8)", gora(max_rank=8), gora_lrs),
            ("GoRA r_max 32, compressed to 16 at export (serves at 16)", gora(compress_to=16), gora_lrs)]
    return [Method(spec.label, name, spec, lrs) for name, spec, lrs in arms]


GORA_KEYS = ("gora",)  # labels starting with these are GoRA variants in the report


@dataclass(frozen=True)
class Mode:
    """One way of running the benchmark: workload sizes, seeds, methods and where results go."""

    name: str
    results: Path
    nlu: dict  # workloads.build_nlu kwargs
    nlg: dict  # workloads.build_nlg kwargs
    nlu_seeds: list[int]
    nlg_seeds: list[int]
    nlu_methods: list[Method]
    nlg_methods: list[Method]
    lr_points: int | None = None  # keep only this many lrs of each window, from its middle (quick mode)
    builders: dict | None = None  # workload name -> builder (tests swap in a tiny one)
    # measure lambda_max per method and seed on these workloads (the "does best lr follow curvature" part)
    curvature: tuple[str, ...] = ("nlu", "nlg")
    # the serving-cost arms (`serving_arms`): NLU at each arm's lrs x nlu_seeds, NLG with --lr auto x nlg_seeds
    serving_nlu: list[Method] = field(default_factory=list)
    serving_nlg: list[Method] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _middle(lrs: list[float], n: int | None) -> list[float]:
    """The `n` lrs nearest the window's middle, in the order they run (middle first, then outwards).

    >>> _middle([1, 2, 3, 4, 5], 3)
    [3, 2, 4]
    """
    c = (len(lrs) - 1) / 2
    order = sorted(range(len(lrs)), key=lambda i: (abs(i - c), i))
    return [lrs[i] for i in order[: n if n is not None else len(lrs)]]


def _gorafit_defaults(m: Method) -> bool:
    return m.template.method == "gora" and m.template.b_lr_max is not None and m.template.max_rank == _gorafit_max_rank()


NLU_SIZES = dict(train_examples=3000, test_examples=2000, max_length=64)
NLG_SIZES = dict(train_examples=1600, test_examples=500)

MODES = {
    "full": Mode(
        name="full", results=RESULTS, nlu=NLU_SIZES, nlg=NLG_SIZES, nlu_seeds=[0, 1, 2], nlg_seeds=[0, 1],
        nlu_methods=methods("nlu", 64), nlg_methods=methods("nlg", 64),
        serving_nlu=serving_arms("nlu", 64), serving_nlg=serving_arms("nlg", 64),
    ),
    "quick": Mode(
        name="quick", results=RESULTS / "quick",
        nlu=dict(train_examples=800, test_examples=500, max_length=64), nlg=dict(train_examples=480, test_examples=200),
        nlu_seeds=[0], nlg_seeds=[0],
        nlu_methods=[m for m in methods("nlu", 16) if m.template.method in ("full", "lora") or _gorafit_defaults(m)],
        nlg_methods=[m for m in methods("nlg", 16) if m.template.method == "lora" or _gorafit_defaults(m)],
        lr_points=1, curvature=("nlu",),  # NLG's Hessian-vector products would take quick mode past 15 minutes
    ),
}


def rounds_of(mode: Mode, workload: str, seed: int) -> list[list[tuple[str, RunSpec]]]:
    """One seed of one workload in rounds: first every method's ("auto", spec), then ("grid", spec) rounds
    from each window's middle outwards (the cells most likely to hold each method's best run first)."""
    ms = mode.nlu_methods if workload == "nlu" else mode.nlg_methods
    out = [[("auto", replace(m.template, lr=AUTO, seed=seed)) for m in ms]]
    windows = [_middle(m.lrs, mode.lr_points) for m in ms]
    for k in range(max(map(len, windows), default=0)):
        out.append([("grid", replace(m.template, lr=w[k], seed=seed)) for m, w in zip(ms, windows) if k < len(w)])
    return out


def planned(mode: Mode) -> list[tuple[str, RunSpec]]:
    """Every run of the mode, in the order it runs: seed by seed; inside a seed, round by round (auto, then
    the windows from the middle out), each round NLU then NLG, so a grid cut short holds both instruments."""
    out = []
    for i in range(max(len(mode.nlu_seeds), len(mode.nlg_seeds))):
        nlu = rounds_of(mode, "nlu", mode.nlu_seeds[i]) if i < len(mode.nlu_seeds) else []
        nlg = rounds_of(mode, "nlg", mode.nlg_seeds[i]) if i < len(mode.nlg_seeds) else []
        for k in range(max(len(nlu), len(nlg))):
            out += (nlu[k] if k < len(nlu) else []) + (nlg[k] if k < len(nlg) else [])
    return out


def serving_planned(mode: Mode, first_seed_best: dict[str, float] | None = None) -> list[tuple[str, RunSpec]]:
    """The serving-cost arms' runs. NLU: each arm at every lr of its window on the first seed, then on the other
    seeds at the lr that did best on the first (`first_seed_best`, label -> lr; the window's middle until the
    first seed is done). NLG: ``--lr auto`` on every seed (its range test sees learning there). A run that is
    also a main-grid cell has the same id, so it runs once."""
    first_seed_best = first_seed_best or {}
    out = []
    for i in range(max(len(mode.nlu_seeds), len(mode.nlg_seeds))):
        if i < len(mode.nlu_seeds):
            for m in mode.serving_nlu:
                lrs = m.lrs if i == 0 else [first_seed_best.get(m.key, _middle(m.lrs, 1)[0])]
                out += [("serving", replace(m.template, lr=lr, seed=mode.nlu_seeds[i])) for lr in _middle(lrs, None)]
        if i < len(mode.nlg_seeds):
            out += [("serving", replace(m.template, lr=AUTO, seed=mode.nlg_seeds[i])) for m in mode.serving_nlg]
    return out


def curvature_specs(mode: Mode) -> list[RunSpec]:
    """One curvature measurement per method and seed (the lr does not enter it)."""
    out = [replace(m.template, lr=0.0, seed=s) for s in mode.nlu_seeds for m in mode.nlu_methods]
    out += [replace(m.template, lr=0.0, seed=s) for s in mode.nlg_seeds for m in mode.nlg_methods]
    return [s for s in out if s.workload in mode.curvature]


def auto_specs(mode: Mode, workload: str, seeds: str | None = None, only: str | None = None) -> list[RunSpec]:
    """Each method's `--lr auto` spec for `workload`, on `seeds` (a comma list; default the mode's), kept to the
    run ids matching one of `only`'s comma-separated fnmatch patterns (the experiment scripts' --seeds, --only)."""
    methods = mode.nlu_methods if workload == "nlu" else mode.nlg_methods
    chosen = ([int(s) for s in seeds.split(",")] if seeds else mode.nlu_seeds if workload == "nlu" else mode.nlg_seeds)
    specs = [replace(m.template, lr=AUTO, seed=seed) for seed in chosen for m in methods]
    if only:
        specs = [s for s in specs if any(fnmatch.fnmatchcase(s.run_id, p) for p in only.split(","))]
    return specs


def in_shard(run_id: str, shard: tuple[int, int]) -> bool:
    """Worker `i` of `n` takes the runs whose id hashes to `i`: n workers share a grid without overlap.

    >>> sum(in_shard("nlu-lora-lr0.001-s0", (i, 3)) for i in range(3))
    1
    """
    i, n = shard
    return zlib.crc32(run_id.encode()) % n == i


def method_names(mode: Mode) -> dict[str, str]:
    """Row key -> display name, in table order."""
    return {m.key: m.name for m in [*mode.nlu_methods, *mode.nlg_methods]}


def is_gora(key: str) -> bool:
    return key.startswith(GORA_KEYS)


def lr_key(lr: float | str) -> float | str:
    """A run's lr as a grouping key: floats compared at 3 significant digits."""
    return lr if isinstance(lr, str) else float(f"{lr:.3g}")


def nearly(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-2)
