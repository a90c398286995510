"""``--step-size auto``: choose GoRA's step size gamma on held-out calibration batches.

The initial adapter ``s_i * B_i @ A_i`` is linear in gamma, so one unit-gamma init gives every
candidate by scaling. For each candidate the search measures the model's mean loss, in eval mode,
on ``K`` batches that follow the ``N`` gradient batches in the data (so the chosen step is the one
that generalises, not the one that fits the batches the gradient came from), and keeps the lowest.

Why: the quality benchmark's probe (benchmarks/results/quality/REPORT.md, section 5) found that on
SmolLM2 the held-out loss of the initial adapter moves from 1.61 (gamma 0) to 0.64 (gamma 0.05, the
paper's default) and 0.58 (gamma 0.1), and blows up to 5.6 at gamma 0.5: the best gamma is a
property of the model and data, and a fixed default can be a factor of two off.

The adapter is added with forward hooks (``y += gamma * s * (x @ A^T) @ B^T``); no weight changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from goraplan import distributed
from goraplan.errors import GoraError
from goraplan.sharded import is_sharded

STEP_SIZE_CANDIDATES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


class StepSizeSearch(BaseModel):
    """What ``--step-size auto`` measured and chose (recorded in the plan's manifest)."""

    model_config = ConfigDict(extra="forbid")

    chosen: float = Field(description="The gamma the initial adapter was built with.")
    held_out_batches: int = Field(description="K: batches after the N gradient batches, used only here.")
    base_loss: float = Field(description="Mean held-out loss of the base model (gamma 0).")
    losses: dict[str, float | None] = Field(
        description="gamma -> mean held-out loss with the initial adapter (None: not finite)."
    )


def choose_step_size(base_loss: float, losses: dict[float, float]) -> float:
    """The candidate with the lowest held-out loss; the smallest candidate when none beats the base
    model (the gradient step does not generalise, so take the smallest step).

    >>> choose_step_size(1.0, {0.01: 0.9, 0.1: 0.7, 0.3: 2.0})
    0.1
    >>> choose_step_size(0.5, {0.01: 0.6, 0.1: 0.7})
    0.01
    """
    best = min(losses, key=lambda g: (losses[g], g))
    return best if losses[best] < base_loss else min(losses)


@contextmanager
def adapters_added(modules: dict[str, nn.Linear], adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within the block, each module's output gains ``x @ A^T @ B^T`` (B already carries gamma and s).

    ``adapters`` maps module name -> (A, B), both mutable in place between forward passes.
    """
    handles = []

    def hook_for(a: torch.Tensor, b: torch.Tensor):
        def hook(_module, inputs, output):
            x = inputs[0]
            return output + F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)

        return hook

    try:
        for name, (a, b) in adapters.items():
            handles.append(modules[name].register_forward_hook(hook_for(a, b)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean loss over ``batches``. On a sharded model rank ``k`` computes batches ``k, k + world, ...`` and
    the sums are added over the ranks (every rank runs the same number of forward passes, which FSDP's
    collectives need: a rank without a batch left repeats the first one and counts nothing)."""
    device = next(model.parameters()).device
    mine = range(len(batches))
    if is_sharded(model):
        world = distributed.world()
        mine = range(distributed.rank(), math.ceil(len(batches) / world) * world, world)
    total = 0.0
    for i in mine:
        counted = i < len(batches)
        batch = batches[i if counted else 0]
        loss = float(model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss)
        total += loss if counted else 0.0
    if is_sharded(model):
        total = distributed.sum_over_ranks([total])[0]
    return total / len(batches)


def search_step_size(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    unit_adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    held_out: Sequence[dict[str, torch.Tensor]],
    candidates: Sequence[float] = STEP_SIZE_CANDIDATES,
) -> StepSizeSearch:
    """Held-out loss for each candidate gamma. ``unit_adapters`` maps module -> (``A``, ``s * B`` at gamma 1):
    the initial adapter is linear in gamma, so each candidate is that ``s * B`` scaled."""
    if not held_out:
        raise GoraError("--step-size auto needs held-out batches after the gradient batches; give more data")
    device = next(model.parameters()).device
    units = {name: (a.to(device), sb.to(device)) for name, (a, sb) in unit_adapters.items()}
    live = {name: (a, torch.empty_like(sb)) for name, (a, sb) in units.items()}
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, held_out)
        losses: dict[float, float] = {}
        with adapters_added(modules, live):
            for gamma in candidates:
                for name, (_, sb) in units.items():
                    live[name][1].copy_(sb).mul_(gamma)
                loss = mean_loss(model, held_out)
                losses[gamma] = loss if math.isfinite(loss) else math.inf
    finally:
        model.train(was_training)
    chosen = choose_step_size(base, losses)
    return StepSizeSearch(
        chosen=chosen,
        held_out_batches=len(held_out),
        base_loss=base,
        losses={f"{g:g}": (v if math.isfinite(v) else None) for g, v in losses.items()},
    )
