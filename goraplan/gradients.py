"""Stage 1, step 1: the accumulated gradient ``G_i = (1/N) sum_t dL_t/dW_i`` of every target weight.

Only the target weights require grad. A post-accumulate-grad hook moves each ``.grad`` into a float32
accumulator the moment autograd finishes it and frees it, so at most one layer's transient gradient
lives beside the accumulators (the reference code's pre-accumulation tensor hook loses the last
layer's final step and sums in bf16: we do neither). Under ``torch.distributed`` each rank takes every
``world_size``-th batch and the sums are all-reduced once at the end, so every rank holds the same ``G``;
on a model sharded with FSDP (``goraplan.sharded``) FSDP sums each backward's gradient over the ranks
and each rank keeps only its rows of ``G``. A problem on one rank (a non-finite loss or gradient) is
shared with every rank after each step, so all stop with the same error and none waits forever.
The model is left as it was found: hooks removed, ``requires_grad``, train/eval mode and gradient
checkpointing restored.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from goraplan import distributed
from goraplan.errors import GoraError
from goraplan.hooked_gradients import HookedGradients, frozen_modules
from goraplan.sharded import gradients_summed, is_sharded, local

T = TypeVar("T")


@dataclass
class GradientResult:
    """Accumulated mean gradients (this process's rows of each when the model is sharded) and what was
    seen while computing them."""

    grads: dict[str, torch.Tensor]
    steps: int
    examples: int = 0
    tokens: int = 0
    mean_loss: float = 0.0
    token_fingerprint: str = ""


def _checkpointing_enabled(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


@contextmanager
def _only_targets_trainable(model: nn.Module, modules: dict[str, nn.Linear], checkpointing: bool):
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    had_checkpointing = _checkpointing_enabled(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in modules.values():
            module.weight.requires_grad_(True)
        if checkpointing and not had_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # eval(): no dropout, so the gradient is a deterministic function of model and data. Checkpointing
        # in transformers only recomputes in training mode, so it needs train() (dropout stays at its config).
        model.train(checkpointing)
        yield
    finally:
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
            p.grad = None
        if checkpointing and not had_checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    modules: dict[str, nn.Linear],
    steps: int,
    *,
    offload: bool = False,
    gradient_checkpointing: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> GradientResult:
    """Mean gradient over ``steps`` batches of every module in ``modules`` (name -> ``nn.Linear``).

    ``batches`` yields dicts that ``model(**batch)`` accepts and whose output has ``.loss``. Under
    ``torch.distributed``, rank ``k`` uses batches ``k, k + world, ...`` of the first ``steps``; on a
    model sharded with FSDP each rank's result holds its rows of every gradient (``sharded.local``).
    ``progress(step, loss)`` is called after each local step.
    """
    rank, world = distributed.rank(), distributed.world()
    sharded = is_sharded(model)
    device = next(model.parameters()).device
    # A weight that cannot require grad (a 4-bit base, QLoRA) gets its G from hooks (goraplan.hooked_gradients).
    frozen = frozen_modules(modules)
    if frozen and sharded:
        raise GoraError("planning a quantized (e.g. 4-bit) model sharded with FSDP is not supported: plan it unsharded")
    trainable = {name: m for name, m in modules.items() if name not in frozen}
    sums = _Accumulators(trainable, torch.device("cpu") if offload else device)
    hooked = HookedGradients(frozen, sums.device)
    sums.sums.update(hooked.sums)
    seen = _Seen()
    with _only_targets_trainable(model, trainable, gradient_checkpointing), sums.hooked(), hooked.capture(), \
            _summed(model, sharded):
        for round_ in _rounds(itertools.islice(batches, steps), world):  # no extra batch consumed
            seen.fingerprint(batch for _, batch in round_)
            mine = round_[rank] if rank < len(round_) else None
            problem = None
            if mine is not None:
                loss, problem = _gradient_step(model, mine[0], _to(mine[1], device))
                seen.count(mine[1], loss)
            elif sharded:  # FSDP's collectives need the same passes on every rank: one that adds zero
                _padding_step(model, _to(round_[0][1], device))
            distributed.raise_if_any(problem or sums.take_problem() or hooked.take_problem())
            if mine is not None and progress is not None:
                progress(mine[0], loss)
    if world > 1 and not sharded:  # a sharded model's gradients were summed over ranks by FSDP already
        sums.all_reduce(device)
    return seen.result(sums.sums, steps)


class _Accumulators:
    """float32 sums of each target's gradient (this rank's rows of it on a sharded model), filled by a
    post-accumulate-grad hook the moment autograd finishes each gradient, which it then frees."""

    def __init__(self, modules: dict[str, nn.Linear], device: torch.device):
        self.modules = modules
        self.device = device
        self.sums = {
            name: torch.zeros(local(m.weight).shape, dtype=torch.float32, device=device) for name, m in modules.items()
        }
        self.name_of = {m.weight: name for name, m in modules.items()}
        self.problem: str | None = None

    def add(self, param: torch.Tensor) -> None:
        # No raise here: the hook runs inside the backward, and every rank must finish it (collectives).
        grad, name = local(param.grad), self.name_of[param]
        if self.problem is None and not torch.isfinite(grad).all():
            self.problem = (
                f"the gradient of {name} is not finite (inf or nan); load the model in float32 "
                "(--dtype float32) or check the calibration data for broken examples"
            )
        self.sums[name].add_(grad.to(self.device, torch.float32))
        param.grad = None

    def take_problem(self) -> str | None:
        problem, self.problem = self.problem, None
        return problem

    @contextmanager
    def hooked(self):
        handles = [m.weight.register_post_accumulate_grad_hook(self.add) for m in self.modules.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def all_reduce(self, device: torch.device) -> None:
        """Sum every accumulator over the ranks (each rank holds whole gradients of its own batches)."""
        for name in sorted(self.sums):
            buf = self.sums[name].to(device)
            torch.distributed.all_reduce(buf)
            self.sums[name] = buf.to(self.device)


class _Seen:
    """What the calibration batches held: every batch's ids into the fingerprint; losses, examples and
    tokens of the batches this rank computed."""

    def __init__(self):
        self.token_hash = hashlib.sha256()
        self.loss_sum, self.batches, self.examples, self.tokens = 0.0, 0, 0, 0

    def fingerprint(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            ids = batch.get("input_ids")
            if ids is not None:
                self.token_hash.update(ids.detach().cpu().contiguous().numpy().tobytes())

    def count(self, batch: dict[str, torch.Tensor], loss: float) -> None:
        self.loss_sum += loss
        self.batches += 1
        ids = batch.get("input_ids")
        if ids is not None:
            self.examples += ids.shape[0]
            mask = batch.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else ids.numel()

    def result(self, sums: dict[str, torch.Tensor], steps: int) -> GradientResult:
        """Totals over the ranks, and the sums divided into means."""
        loss_sum, n_total, examples, tokens = distributed.sum_over_ranks(
            [self.loss_sum, self.batches, self.examples, self.tokens]
        )
        n_total = int(n_total)
        if n_total < steps:
            raise GoraError(
                f"the data gave only {n_total} batches but {steps} gradient steps were asked for; "
                "lower --steps or give more data"
            )
        for g in sums.values():
            g.div_(n_total)
        return GradientResult(
            grads=sums,
            steps=n_total,
            examples=int(examples),
            tokens=int(tokens),
            mean_loss=loss_sum / n_total,
            token_fingerprint="sha256:" + self.token_hash.hexdigest(),
        )


def _rounds(batches: Iterable[T], world: int) -> Iterator[list[tuple[int, T]]]:
    """``(step, batch)`` pairs in rounds of ``world``: in each round rank ``k`` takes the ``k``-th."""
    numbered = enumerate(batches)
    while round_ := list(itertools.islice(numbered, world)):
        yield round_


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _gradient_step(model: nn.Module, step: int, batch: dict) -> tuple[float, str | None]:
    """Forward and backward on one batch; its loss, and what is wrong with it if anything."""
    loss = model(**batch).loss
    if loss is None:
        raise GoraError("the model returned no loss for a batch; batches need labels")
    loss.backward()  # even when not finite: the other ranks wait in this backward's collectives
    value = float(loss.detach())
    if not math.isfinite(value):
        return value, f"the loss of calibration batch {step} is not finite; check that batch's data"
    return value, None


def _padding_step(model: nn.Module, batch: dict) -> None:
    """A forward and backward that adds nothing to any gradient (keeps a rank in step with the others)."""
    (model(**batch).loss * 0.0).backward()


@contextmanager
def _summed(model: nn.Module, sharded: bool):
    if not sharded:
        yield
        return
    with gradients_summed(model):
        yield
