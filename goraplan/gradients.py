"""Stage 1, step 1: the accumulated gradient ``G_i = (1/N) sum_t dL_t/dW_i`` of every target weight.

Only the target weights require grad. A post-accumulate-grad hook moves each ``.grad`` into a float32
accumulator the moment autograd finishes it and frees it, so at most one layer's transient gradient
lives beside the accumulators (the reference code's pre-accumulation tensor hook loses the last
layer's final step and sums in bf16: we do neither). Under ``torch.distributed`` each rank takes every
``world_size``-th batch and the sums are all-reduced once at the end, so every rank holds the same ``G``.
The model is left as it was found: hooks removed, ``requires_grad``, train/eval mode and gradient
checkpointing restored.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from goraplan import distributed
from goraplan.errors import GoraError


@dataclass
class GradientResult:
    """Accumulated mean gradients and what was seen while computing them."""

    grads: dict[str, torch.Tensor]
    steps: int
    examples: int = 0
    tokens: int = 0
    mean_loss: float = 0.0
    token_fingerprint: str = ""
    extra: dict = field(default_factory=dict)


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
    ``torch.distributed``, rank ``k`` uses batches ``k, k + world, ...`` of the first ``steps``.
    ``progress(step, loss)`` is called after each local step.
    """
    rank, world = distributed.rank(), distributed.world()
    device = next(model.parameters()).device
    acc_device = torch.device("cpu") if offload else device
    acc = {
        name: torch.zeros(m.weight.shape, dtype=torch.float32, device=acc_device) for name, m in modules.items()
    }
    name_of = {m.weight: name for name, m in modules.items()}

    def move_to_accumulator(param: torch.Tensor) -> None:
        grad = param.grad
        name = name_of[param]
        if not torch.isfinite(grad).all():
            raise GoraError(
                f"the gradient of {name} is not finite (inf or nan); load the model in float32 "
                "(--dtype float32) or check the calibration data for broken examples"
            )
        acc[name].add_(grad.to(acc_device, torch.float32))
        param.grad = None

    token_hash = hashlib.sha256()
    loss_sum, n_local, examples, tokens = 0.0, 0, 0, 0
    handles = []
    with _only_targets_trainable(model, modules, gradient_checkpointing):
        try:
            handles = [m.weight.register_post_accumulate_grad_hook(move_to_accumulator) for m in modules.values()]
            for step, batch in enumerate(itertools.islice(batches, steps)):  # no extra batch consumed
                ids = batch.get("input_ids")
                if ids is not None:
                    token_hash.update(ids.detach().cpu().contiguous().numpy().tobytes())
                if step % world != rank:
                    continue
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = model(**batch).loss
                if loss is None:
                    raise GoraError("the model returned no loss for a batch; batches need labels")
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise GoraError(f"the loss of calibration batch {step} is not finite; check that batch's data")
                loss.backward()
                loss_sum += loss_value
                n_local += 1
                if ids is not None:
                    examples += ids.shape[0]
                    mask = batch.get("attention_mask")
                    tokens += int(mask.sum()) if mask is not None else ids.numel()
                if progress is not None:
                    progress(step, loss_value)
        finally:
            for h in handles:
                h.remove()

    totals = torch.tensor([loss_sum, n_local, examples, tokens], dtype=torch.float64)
    if world > 1:
        for name in sorted(acc):
            buf = acc[name].to(device)
            torch.distributed.all_reduce(buf)
            acc[name] = buf.to(acc_device)
        totals_dev = totals.to(device)
        torch.distributed.all_reduce(totals_dev)
        totals = totals_dev.cpu()
    n_total = int(totals[1])
    if n_total < steps:
        raise GoraError(
            f"the data gave only {n_total} batches but {steps} gradient steps were asked for; "
            "lower --steps or give more data"
        )
    for g in acc.values():
        g.div_(n_total)
    return GradientResult(
        grads=acc,
        steps=n_total,
        examples=int(totals[2]),
        tokens=int(totals[3]),
        mean_loss=float(totals[0]) / n_total,
        token_fingerprint="sha256:" + token_hash.hexdigest(),
    )
