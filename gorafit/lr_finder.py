"""Choosing the learning rate from the model and the training data (``gorafit run --lr auto``).

Why here and not in planning: the learning rate that works depends on everything the optimizer sees
(the method's initial adapter, its parameter groups with their lr multipliers such as LoRA+'s or
GoRA's B/A ratio, the clip, AdamW itself), and only the training side has all of it, for every method
(plain LoRA has no plan at all). Planning has GoRA's gradients, but not the optimizer.

Two measurements, both on training batches only (never an evaluation or test set):

- **Range test** (what ``--lr auto`` uses). From the same starting weights, train ``k`` short steps at a
  candidate lr, score the loss on held-out *training* batches, put the weights back. Every short run's
  optimizer starts from the same moments, settled at lr 0 on ``k`` other training batches: a fresh Adam's
  first steps are sign steps of the full lr on every coordinate, which a real run's warm-up hides and a
  short probe would not, so they would make small lrs look best on an adapter whose start already helps
  (GoRA's, measured on NLG: docs/method.md §10). The walk moves in half-decade steps from a start value to bracket the *stability edge* (the
  largest lr whose held-out loss stays within `EDGE` of the start's), then chooses by one of two rules:

  - *learning seen*: some candidate lowers the held-out loss by at least `GAIN`. The walk goes on
    downwards while the loss keeps falling, tries the quarter-decade points either side of the best,
    and chooses the lowest held-out loss.
  - *no learning seen*: no candidate lowers it. A short probe on a new classification head sees only a
    plateau: the real run needs more steps than the probe's whole budget before its loss moves. Then the
    data cannot choose, and the search says so and keeps `fallback` (gorafit's default lr). The edge,
    refined to a quarter-decade, is recorded as evidence (``extra["edge"]``): on one seed of the quality
    benchmark it sat at or next to every method's best lr but one, on another seed 2-3 quarter-decades
    above it, so it is not safe to train at (docs/method.md §10).

  Everything is kept (`LrSearch`): every candidate, its score, the rule, the chosen value, the seconds
  it took, and a picture (`plot_lr_search`).
- **Curvature**: the largest eigenvalue of the loss Hessian along the trainable parameters, by power
  iteration with Hessian-vector products (`hessian_top_eigenvalue`); with per-parameter lr multipliers
  it is the eigenvalue of ``M^1/2 H M^1/2``, the curvature the optimizer's steps actually see. The
  quality benchmark records it to test whether a method's best lr follows ``1 / lambda_max``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gorafit.optim import LR_DEFAULT
from goraplan.errors import GoraError

__all__ = [
    "Candidate",
    "LrSearch",
    "ProbeBatches",
    "find_lr",
    "probe_batches",
    "probe_steps_for_budget",
    "hessian_top_eigenvalue",
    "mean_loss",
    "resume_optimizer",
    "settled_state",
    "format_lr_search",
    "read_lr_search",
    "save_lr_search",
    "search_training_data",
    "plot_lr_search",
]

QUARTER_DECADE = 10 ** 0.25  # the lattice the walk moves on (half-decade steps, then the quarter between)
GAIN = 0.05  # a held-out loss this much (relative) below the start's: the probe saw learning, not noise
EDGE = 0.03  # a held-out loss this much (relative) above the start's: the lr hurts (the stability edge)
LR_BOUNDS = (1e-7, 1.0 + 1e-9)  # the walk never leaves these (1.0 itself included)
# What a training step costs whatever its size (the optimizer step, clipping, the Python around each adapter
# layer), in examples' worth of forward and backward. Fitted to the quality benchmark's run files (CPU,
# SmolLM2-135M with LoRA-family adapters: 1.2 to 2.2 across methods); without it the probe's small steps cost
# 1.5x per example what the run's steps do and the search overran its 10% share (8.0-14.0% on NLG).
STEP_OVERHEAD = 2.0
# What the optimizer's update over every weight of the model adds to a step, in the same units: full
# fine-tuning of SmolLM2-135M cost 5.8 examples' worth per step in all (its auto runs overran to 12.1 % with
# 2.0 alone). A model pays its trainable share of it (`step_overhead`): an adapter's is a few hundredths.
OPTIMIZER_OVERHEAD = 3.8


LEARNING_SEEN = "learning seen: the lowest held-out training loss after the short run"
NO_LEARNING_SEEN = (f"no learning seen (no candidate lowered the held-out loss by {GAIN:.0%}): kept the default lr; "
                    f"the stability edge (the largest lr whose held-out loss stays within {EDGE:.0%} of the start) "
                    f"is in extra['edge']")

# Below this many probe steps per candidate the choice is not trusted. One step measures only the first step's
# drop, which grows with the lr until it diverges: on a 60-step SmolLM2 run (one step of 2 per candidate) it
# chose 1e-2 for LoRA, and the run collapsed to 0 % exact match.
MIN_PROBE_STEPS = 2
TOO_FEW_STEPS = ("too few probe steps (the run is too short for more than one per candidate within the budget, and one "
                 "step's drop grows with the lr until it diverges): no candidate run, kept the default lr")


@dataclass(frozen=True)
class Candidate:
    """One learning rate tried: the held-out training loss after its short run (inf when it diverged)."""

    lr: float
    held_out_loss: float
    train_losses: list[float]

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.held_out_loss)


@dataclass
class LrSearch:
    """The evidence of one range test: enough to redraw its picture and to check its choice."""

    chosen: float
    candidates: list[Candidate]
    start_loss: float  # held-out loss before any step (lr 0)
    steps_per_candidate: int
    probe_batch_size: int | None
    held_out_batches: int
    seconds: float
    rule: str = LEARNING_SEEN
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        for c in data["candidates"]:  # JSON has no inf
            c["held_out_loss"] = c["held_out_loss"] if math.isfinite(c["held_out_loss"]) else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LrSearch:
        """The search from its JSON form, every field checked (a run folder may come from anyone).

        >>> LrSearch.from_dict({"chosen": 1e-4, "candidates": [], "start_loss": 0.7, "steps_per_candidate": 3,
        ...                     "probe_batch_size": 8, "held_out_batches": 1, "seconds": 1.0, "extra": {"edge": "x"}})
        Traceback (most recent call last):
        TypeError: extra.edge is not a number
        """
        if not isinstance(data, dict) or not isinstance(data["candidates"], list):
            raise TypeError("the search or its candidates has the wrong type")
        candidates = [Candidate(_number(c["lr"], "a candidate's lr"), _loss(c["held_out_loss"]),
                                [_loss(x) for x in _list(c["train_losses"])]) for c in data["candidates"]]
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise TypeError("extra is not an object")
        for key in ("edge", "edge_tolerance", "gain_needed", "settle_steps", "step_overhead"):
            if extra.get(key) is not None:
                _number(extra[key], f"extra.{key}")
        rule = data.get("rule", LEARNING_SEEN)
        if not isinstance(rule, str):
            raise TypeError("rule is not text")
        probe = data["probe_batch_size"]
        return cls(chosen=_number(data["chosen"], "chosen"), candidates=candidates,
                   start_loss=_loss(data["start_loss"]),  # inf (written as null) when the start did not compute
                   steps_per_candidate=int(_number(data["steps_per_candidate"], "steps_per_candidate")),
                   probe_batch_size=None if probe is None else int(_number(probe, "probe_batch_size")),
                   held_out_batches=int(_number(data["held_out_batches"], "held_out_batches")),
                   seconds=_number(data["seconds"], "seconds"), rule=rule, extra=extra)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} is not a number")
    return float(value)


def _loss(value: object) -> float:
    """A loss as written (JSON has no inf: a diverged one is null)."""
    return math.inf if value is None else _number(value, "a loss")


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise TypeError("train_losses is not a list")
    return value


# ------------------------------------------------------------------------------------------ range test
def probe_steps_for_budget(train_steps: int, train_batch_size: int, probe_batch_size: int, held_out_examples: int,
                           *, candidates: int = 7, share: float = 0.10, step_overhead: float = STEP_OVERHEAD) -> int:
    """How many probe steps per candidate keep the whole search within `share` of the training run's cost.

    Cost is counted in example passes: a training step of `b` examples costs ``3 * (b + step_overhead)``
    (forward and backward, plus the work every step does whatever its size), a held-out forward pass 1 per
    example. The search runs about `candidates` short runs plus one unscored start.

    >>> probe_steps_for_budget(94, 32, 8, 32, candidates=6)
    4
    >>> probe_steps_for_budget(200, 8, 2, 8)  # the small probe steps pay the step overhead more often
    6
    >>> probe_steps_for_budget(10, 32, 8, 32)  # a run too short for any search within 10%: one step each
    1
    """
    budget = share * 3 * train_steps * (train_batch_size + step_overhead)
    per_candidate = budget / candidates - held_out_examples - held_out_examples / candidates
    return max(1, int(per_candidate // (3 * (probe_batch_size + step_overhead))))


def step_overhead(model: nn.Module) -> float:
    """`STEP_OVERHEAD` plus the model's trainable share of `OPTIMIZER_OVERHEAD`: what one step of this model's
    training costs whatever its size, in examples' worth (`probe_steps_for_budget`)."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return STEP_OVERHEAD + OPTIMIZER_OVERHEAD * trainable / max(total, 1)


class ProbeBatches(NamedTuple):
    """The range test's data (`probe_batches`): batches that settle the optimizer's moments, the short runs'
    batches, and the held-out batches that score them."""

    settle: list[dict]
    train: list[dict]
    held_out: list[dict]


def probe_batches(n_rows: int, collate: Callable[[list[int]], dict], batch_size: int, train_steps: int, seed: int,
                  *, share: float = 0.10, candidates: int = 7,
                  step_overhead: float = STEP_OVERHEAD) -> ProbeBatches:
    """The range test's data, from the training set only: one held-out batch of `batch_size` examples and two sets
    of short-run batches of a quarter of it, one to settle the optimizer's moments (`settled_state`) and one that
    every candidate trains on. Their steps are as many as keep the search within `share` of the training run
    (`probe_steps_for_budget` at `step_overhead`, the settling counted as one more candidate). Rows are drawn
    from the end of the seed's permutation; `collate(indices)` turns row indices into a batch.
    """
    probe = max(1, batch_size // 4)
    steps = probe_steps_for_budget(train_steps, batch_size, probe, batch_size, candidates=candidates + 1, share=share,
                                   step_overhead=step_overhead)
    need = batch_size + 2 * steps * probe
    if n_rows < need:
        raise GoraError(f"--lr auto needs at least {need} training examples (twice {steps} probe steps of {probe}, "
                        f"to settle the optimizer and to train, and a held-out batch of {batch_size}); the data has "
                        f"{n_rows}: give more data or a number")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    held, short = order[-batch_size:], order[-need:-batch_size]
    batches = [collate(short[i:i + probe]) for i in range(0, len(short), probe)]
    return ProbeBatches(settle=batches[:steps], train=batches[steps:], held_out=[collate(held)])


def _default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def mean_loss(model: nn.Module, batches: Sequence[dict],
              loss_fn: Callable[[nn.Module, dict], torch.Tensor] = _default_loss) -> float:
    """The mean loss over `batches`, forward only in eval mode (the model's mode is put back); inf if not finite."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [loss_fn(model, b).item() for b in batches]
    model.train(was_training)
    value = sum(losses) / len(losses)
    return value if math.isfinite(value) else math.inf


def resume_optimizer(make_optimizer: Callable[[float], torch.optim.Optimizer], lr: float,
                     start_state: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer at base lr `lr`, fresh or from a copy of `start_state` (e.g. `settled_state`'s, whose lrs are 0):
    each group keeps the lr `make_optimizer(lr)` gave it, multipliers included."""
    optimizer = make_optimizer(lr)
    if start_state is not None:
        peak = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(copy.deepcopy(start_state))  # a copy: the steps taken must not change it
        for g, top in zip(optimizer.param_groups, peak, strict=True):
            g["lr"] = top
    return optimizer


def short_run(model: nn.Module, make_optimizer: Callable[[float], torch.optim.Optimizer], lr: float,
              train_batches: Sequence[dict], held_out: Sequence[dict], *, max_grad_norm: float | None = 1.0,
              loss_fn: Callable[[nn.Module, dict], torch.Tensor] = _default_loss, warmup: bool = False,
              start_state: dict | None = None) -> Candidate:
    """Train on `train_batches` at `lr`, then score `held_out`. The optimizer is fresh, or starts from
    `start_state` (its state dict, e.g. `settled_state`'s) with the lr still `lr`. With `warmup` the lr rises
    linearly to `lr` over the batches (step t of k at ``lr * t / k``), as a run's warm-up does; else it is constant.

    The caller restores the weights afterwards (`find_lr` does)."""
    optimizer = resume_optimizer(make_optimizer, lr, start_state)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    peak = [g["lr"] for g in optimizer.param_groups]
    losses = []
    model.train()
    for step, batch in enumerate(train_batches, start=1):
        if warmup:
            for g, top in zip(optimizer.param_groups, peak, strict=True):
                g["lr"] = top * step / len(train_batches)
        loss = _train_step(model, optimizer, params, batch, max_grad_norm, loss_fn)
        if not math.isfinite(loss):
            return Candidate(lr, math.inf, losses + [math.inf])
        losses.append(round(loss, 6))
    return Candidate(lr, mean_loss(model, held_out, loss_fn), losses)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], batch: dict,
                max_grad_norm: float | None, loss_fn: Callable[[nn.Module, dict], torch.Tensor]) -> float:
    """One step (forward, backward, clip, step) and its loss; a non-finite loss takes no step."""
    loss = loss_fn(model, batch)
    if torch.isfinite(loss):
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item() if torch.isfinite(loss) else math.inf


def settled_state(model: nn.Module, make_optimizer: Callable[[float], torch.optim.Optimizer],
                  batches: Sequence[dict], *, max_grad_norm: float | None = 1.0,
                  loss_fn: Callable[[nn.Module, dict], torch.Tensor] = _default_loss) -> dict:
    """The optimizer's state after steps on `batches` at lr 0: moments that have seen the gradients, weights that
    have not moved. A fresh Adam's first steps are sign steps of full size on every coordinate, noise or signal;
    a run's warm-up hides them behind a small lr, and so do these moments for a short run that starts from them."""
    optimizer = make_optimizer(1.0)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    model.train()
    for batch in batches:
        _train_step(model, optimizer, params, batch, max_grad_norm, loss_fn)
    return copy.deepcopy(optimizer.state_dict())


class _Snapshot:
    """A copy of the trainable weights, put back between candidates (every candidate starts alike)."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [p.detach().clone() for p in self.params]

    def restore(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved, strict=True):
                p.copy_(s)
                p.grad = None


def find_lr(model: nn.Module, make_optimizer: Callable[[float], torch.optim.Optimizer],
            train_batches: Sequence[dict], held_out: Sequence[dict], *, start: float = 1e-3,
            max_grad_norm: float | None = 1.0, tolerance: float = 1e-4, max_candidates: int | None = None,
            loss_fn: Callable[[nn.Module, dict], torch.Tensor] = _default_loss,
            fallback: float = LR_DEFAULT, warmup: bool = False,
            settle_batches: Sequence[dict] = ()) -> LrSearch:
    """The range test: see the module's docstring for the two rules (`fallback`: the lr kept when no learning
    is seen).

    `make_optimizer(lr)` builds the optimizer the real run would build at base lr `lr` (its groups keep
    their multipliers). Candidates lie on the quarter-decade lattice through `start`; `tolerance` is
    the relative margin by which one held-out loss must beat another to count as lower. The model leaves
    with the weights it came with; its RNG state is restored so the real run that follows draws what it
    would have drawn without the search. At most `max_candidates` short runs (the budget
    `probe_steps_for_budget` sized the steps for): the walk stops two short of it, so that the quarter-decade
    refinement still fits. `settle_batches`: each short run starts from the optimizer state these batches leave at
    lr 0 (`settled_state`; ``--lr auto`` passes them, `search_training_data`); without them it starts fresh.
    `warmup`: each short run climbs linearly to its lr (`short_run`); off by default (measured on NLG, not adopted:
    ``benchmarks/results/quality/probe-draws.md``).
    """
    if not train_batches or not held_out:
        raise ValueError("find_lr needs at least one training batch and one held-out batch")
    t0 = time.perf_counter()
    snapshot = _Snapshot(model)
    rng = torch.random.get_rng_state()
    was_training = model.training
    tried: dict[int, Candidate] = {}  # by quarter-decade step k from start: lr = start * 10^(k/4)
    walk_cap = math.inf if max_candidates is None else max(2, max_candidates - 2)

    def lr_at(k: int) -> float:
        return float(f"{start * 10 ** (k / 4):.3g}")  # 3 significant digits: the same lattice as a grid

    def trial(k: int) -> Candidate:
        if k not in tried:
            tried[k] = short_run(model, make_optimizer, lr_at(k), train_batches, held_out,
                                 max_grad_norm=max_grad_norm, loss_fn=loss_fn, warmup=warmup, start_state=state)
            snapshot.restore()
        return tried[k]

    def inside(k: int) -> bool:
        return LR_BOUNDS[0] <= lr_at(k) <= LR_BOUNDS[1]

    def can_walk(k: int) -> bool:
        return inside(k) and (k in tried or len(tried) < walk_cap)

    def can_refine(k: int) -> bool:
        return inside(k) and (max_candidates is None or k in tried or len(tried) < max_candidates)

    try:
        start_loss = mean_loss(model, held_out, loss_fn)
        state = (settled_state(model, make_optimizer, settle_batches, max_grad_norm=max_grad_norm, loss_fn=loss_fn)
                 if settle_batches else None)

        def hurts(k: int) -> bool:  # past the stability edge: the short run leaves the held-out loss clearly worse
            return trial(k).held_out_loss > start_loss * (1 + EDGE)

        def learned(c: Candidate) -> bool:
            return c.held_out_loss < start_loss * (1 - GAIN)

        def lower(a: int, b: int) -> bool:
            return trial(a).held_out_loss < trial(b).held_out_loss - tolerance * abs(trial(b).held_out_loss)

        # 1. bracket the edge at half-decades: `edge` is the largest lr tried that does not hurt
        edge = 0
        if hurts(0):
            while hurts(edge) and can_walk(edge - 2):
                edge -= 2
        else:
            while can_walk(edge + 2) and not hurts(edge + 2):
                edge += 2
        top_hurts = (edge + 2) in tried and hurts(edge + 2)
        if any(learned(c) for c in tried.values()):
            # learning seen: downwards while the held-out loss keeps falling, then either side of the best
            best = min((k for k in tried if not hurts(k)), key=lambda k: tried[k].held_out_loss, default=edge)
            while can_walk(best - 2) and lower(best - 2, best):
                best -= 2
            for k in (best - 1, best + 1):
                if can_refine(k):
                    trial(k)
            rule = LEARNING_SEEN
        else:
            # no learning seen: refine the edge for the record (the quarter-decade above the last lr that does
            # not hurt), and keep the fallback
            if not hurts(edge) and top_hurts and can_refine(edge + 1):
                trial(edge + 1)
            rule = NO_LEARNING_SEEN
    finally:
        snapshot.restore()
        torch.random.set_rng_state(rng)
        model.train(was_training)
    candidates = sorted(tried.values(), key=lambda c: c.lr)
    safe = [c.lr for c in candidates if c.held_out_loss <= start_loss * (1 + EDGE)]
    found_edge = max(safe) if safe and max(safe) < candidates[-1].lr else None  # a larger lr tried, and it hurt
    if rule == LEARNING_SEEN:
        chosen = min((c for c in candidates if not c.diverged), key=lambda c: c.held_out_loss).lr
    else:
        chosen = fallback
    probe_batch = _batch_size(train_batches[0])
    return LrSearch(chosen=chosen, candidates=candidates, start_loss=start_loss,
                    steps_per_candidate=len(train_batches), probe_batch_size=probe_batch,
                    held_out_batches=len(held_out), seconds=round(time.perf_counter() - t0, 3), rule=rule,
                    extra={"edge": found_edge, "gain_needed": GAIN, "edge_tolerance": EDGE})


def _batch_size(batch: dict) -> int | None:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def search_training_data(model: nn.Module, rows: Sequence[dict], collate: Callable[[list[dict]], dict],
                         make_optimizer: Callable[[float], torch.optim.Optimizer], *, batch_size: int,
                         train_steps: int, seed: int, max_grad_norm: float | None = 1.0,
                         share: float = 0.10, candidates: int = 7, fallback: float = LR_DEFAULT) -> LrSearch:
    """`find_lr` as ``gorafit run --lr auto`` runs it: on `rows` of the training set only (`probe_batches`),
    moved to the model's device, with the run's own optimizer factory, from settled moments. With fewer than
    `MIN_PROBE_STEPS` steps per candidate it runs no candidate and keeps `fallback` (rule `TOO_FEW_STEPS`)."""
    device = next(p.device for p in model.parameters())

    def batch(indices: list[int]) -> dict:
        collated = collate([rows[i] for i in indices])
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}

    overhead = step_overhead(model)
    probe = probe_batches(len(rows), batch, batch_size, train_steps, seed, share=share, candidates=candidates,
                          step_overhead=overhead)
    if len(probe.train) < MIN_PROBE_STEPS:  # not worth its cost: only the start's loss, for the record
        t0 = time.perf_counter()
        start_loss = mean_loss(model, probe.held_out, _default_loss)
        search = LrSearch(chosen=fallback, candidates=[], start_loss=start_loss, steps_per_candidate=len(probe.train),
                          probe_batch_size=_batch_size(probe.train[0]), held_out_batches=len(probe.held_out),
                          seconds=round(time.perf_counter() - t0, 3), rule=TOO_FEW_STEPS)
    else:
        search = find_lr(model, make_optimizer, probe.train, probe.held_out, max_grad_norm=max_grad_norm,
                         max_candidates=candidates, fallback=fallback, settle_batches=probe.settle)
    search.extra.update(train_steps=train_steps, batch_size=batch_size, share_budget=share,
                        settle_steps=len(probe.settle), step_overhead=round(overhead, 4))
    return search


def save_lr_search(path: str | Path, search: LrSearch, *, plot_path: str | Path | None = None, title: str = "") -> Path:
    """Write the evidence: `path` (JSON: every candidate, its score, the choice) and, given `plot_path` and
    matplotlib, its picture. A run folder's names are `gorafit.run_folder`'s (``save_lr_search`` there)."""
    from goraplan.files import write_json_atomic

    written = write_json_atomic(path, search.to_dict(), indent=1)
    if plot_path is not None:
        plot_lr_search(search, plot_path, title)
    return written


def read_lr_search(path: str | Path) -> LrSearch | None:
    """The search kept in `path`, or None when there is none."""
    from goraplan.untrusted import printable, read_json_object

    path = Path(path)
    if not path.is_file():
        return None
    data = read_json_object(path, "learning-rate search")
    try:
        return LrSearch.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise GoraError(f"{printable(path)} is not a learning-rate search this gorafit wrote "
                        f"({printable(exc)}); delete it or rerun") from None


# ------------------------------------------------------------------------------------------ curvature
def hessian_top_eigenvalue(loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *,
                           multipliers: Sequence[float] | None = None, iterations: int = 20,
                           tolerance: float = 1e-3, seed: int = 0) -> tuple[float, list[float]]:
    """The largest-magnitude eigenvalue of ``M^1/2 H M^1/2`` (H: the Hessian of `loss` along `params`,
    M: one lr multiplier per tensor, 1 by default), by power iteration with Hessian-vector products.

    Returns the eigenvalue and its estimate at every iteration. Each iteration costs one double
    backward through `loss()`; it stops when two estimates agree within `tolerance` (relative).

    >>> w = torch.zeros(2, requires_grad=True)
    >>> value, _ = hessian_top_eigenvalue(lambda: 0.5 * (3 * w[0] ** 2 + w[1] ** 2), [w])
    >>> round(value, 2)
    3.0
    """
    params = list(params)
    scale = [math.sqrt(m) for m in (multipliers or [1.0] * len(params))]
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    v = _normalised(v)
    # The fused CPU/GPU attention kernels have no double backward; the math kernel has.
    with sdpa_kernel(SDPBackend.MATH):
        value_loss = loss()
    grads = torch.autograd.grad(value_loss, params, create_graph=True)
    history: list[float] = []
    for _ in range(iterations):
        scaled = [s * x for s, x in zip(scale, v, strict=True)]
        dot = sum((g * x).sum() for g, x in zip(grads, scaled, strict=True))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        hv = [s * h.detach() for s, h in zip(scale, hv, strict=True)]
        estimate = sum((h * x).sum() for h, x in zip(hv, v, strict=True)).item()
        history.append(estimate)
        v = _normalised(hv)
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tolerance * abs(history[-1]):
            break
    return history[-1], history


def _normalised(vectors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    vectors = list(vectors)
    norm = math.sqrt(sum(float((x * x).sum()) for x in vectors)) or 1.0
    return [x / norm for x in vectors]


# ------------------------------------------------------------------------------------------ evidence
def format_lr_search(search: LrSearch) -> str:
    """The search as text: one line per candidate, the chosen one marked."""
    from goraplan.untrusted import printable

    # every field but the rule is a checked number (`LrSearch.from_dict`); the rule may come from anyone's file
    lines = [f"lr search: chose {search.chosen:.3g} ({printable(search.rule)}); {len(search.candidates)} candidates, "
             f"{search.steps_per_candidate} steps each of {search.probe_batch_size} examples, "
             f"{search.held_out_batches} held-out training batches, {search.seconds:.1f} s",
             f"  {'lr':>10}  {'held-out loss':>13}", f"  {'0 (start)':>10}  {search.start_loss:>13.4f}"]
    if search.extra.get("settle_steps"):
        lines.insert(1, f"  each short run starts from AdamW moments settled at lr 0 on {search.extra['settle_steps']:.0f} "
                        f"other training batches")
    for c in search.candidates:
        loss = "diverged" if c.diverged else f"{c.held_out_loss:.4f}"
        lines.append(f"  {c.lr:>10.3g}  {loss:>13}{'  <- chosen' if c.lr == search.chosen else ''}")
    if all(c.lr != search.chosen for c in search.candidates):
        lines.append(f"  chosen: {search.chosen:.3g}, the default (the rule above says why)")
    if search.extra.get("edge"):
        lines.append(f"  stability edge: {search.extra['edge']:.3g} (the largest lr whose held-out loss stays within "
                     f"{search.extra.get('edge_tolerance', EDGE):.0%} of the start)")
    return "\n".join(lines)


def plot_lr_search(search: LrSearch, path: str | Path, title: str = "") -> Path | None:
    """Held-out loss against lr (log axis), the chosen lr marked; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from goraplan.files import atomic_file

    finite = [c for c in search.candidates if not c.diverged]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([c.lr for c in finite], [c.held_out_loss for c in finite], marker="o")
    if math.isfinite(search.start_loss):
        ax.axhline(search.start_loss, color="grey", linestyle="--", linewidth=1, label="before training")
    ax.axvline(search.chosen, color="tab:red", linewidth=1, label=f"chosen {search.chosen:.3g}")
    for c in search.candidates:
        if c.diverged:
            ax.axvline(c.lr, color="black", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out training loss")
    ax.set_title(title or f"lr range test: {search.steps_per_candidate} steps per candidate", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
