"""The LoRA+ optimizer GoRA trains with: every ``lora_B`` at ``lr_ratio`` times the learning rate, capped.

GoRA's stage 2 (docs/method.md §6) trains B faster than A (LoRA+, ratio 16). The cap ``lr_b_max`` keeps
B's learning rate at or below the highest value GoRA trained stably at in the quality benchmark
(docs/method.md §8), but never below the learning rate of A. `create_optimizer` is the one place these
groups are built: `gorafit run` (through `GoraTrainer`), a plain `Trainer`, TRL and a hand-written loop
all get the same optimizer.

torch and transformers are imported inside the functions, so reading the default cap stays cheap.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from goraplan.errors import GoraError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LR_B_MAX_DEFAULT", "LR_RATIO_DEFAULT", "create_optimizer", "effective_lr_ratio", "lora_plus_param_groups"]

# gorafit run --lr, and what --lr auto keeps when its probe sees no learning. The paper's 1e-4 trained GoRA (gorafit's
# defaults) worse on both quality instruments: NLU 82.73 against 84.38 % (3 seeds), NLG completion loss 0.463 against
# 0.439 (docs/method.md §10); larger lrs won on NLU but lost on NLG.
LR_DEFAULT = 3.16e-4
LR_RATIO_DEFAULT = 16.0  # the paper's B/A learning-rate ratio
LR_B_MAX_DEFAULT = 3e-3  # the quality benchmark's stable range (docs/method.md §8, §10)
WEIGHT_DECAY_DEFAULT = 5e-4  # the paper's
_LORA_B = re.compile(r"(^|\.)lora_B(\.|$)")


def effective_lr_ratio(learning_rate: float, lr_ratio: float, lr_b_max: float | None) -> float:
    """The B/A ratio after the cap on lora_B's learning rate: ``min(lr_ratio, max(1, lr_b_max / lr))``.

    >>> effective_lr_ratio(1e-4, 16, 5e-3)   # below the cap: the ratio as given
    16
    >>> effective_lr_ratio(1e-3, 16, 5e-3)   # B capped at 5e-3
    5.0
    >>> effective_lr_ratio(1e-2, 16, 5e-3)   # never below lr
    1.0
    """
    if lr_b_max is None:
        return lr_ratio
    return min(lr_ratio, max(1.0, lr_b_max / learning_rate))


def lora_plus_param_groups(
    model: nn.Module,
    learning_rate: float,
    lr_ratio: float,
    weight_decay: float,
    decay_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: every ``lora_B`` at ``lr_ratio * learning_rate``, all other trainable
    parameters (``lora_A``, a classification head) at ``learning_rate``; no weight decay where
    ``decay_names`` (the Trainer's choice: not biases, not norms) leaves it out. Empty groups are dropped.
    ``lr_ratio`` is applied as given (`create_optimizer` applies the cap first).

    >>> groups = lora_plus_param_groups(peft_model, 1e-4, 16, 0.0)  # doctest: +SKIP
    >>> [(g["name"], g["lr"]) for g in groups]                        # doctest: +SKIP
    [('lora_A', 0.0001), ('lora_B', 0.0016)]
    """
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "lora_B" if _LORA_B.search(name) else "lora_A"
        decay = decay_names is None or name in decay_names
        buckets.setdefault((kind, decay), []).append(param)
    groups = []
    for kind in ("lora_A", "lora_B"):  # lora_A first: the Trainer logs the lr of the first group
        for decay in (True, False):
            params = buckets.get((kind, decay))
            if params:
                groups.append({
                    "name": kind if decay else f"{kind}_no_decay",
                    "params": params,
                    "lr": learning_rate * (lr_ratio if kind == "lora_B" else 1.0),
                    "weight_decay": weight_decay if decay else 0.0,
                })
    if not groups:
        raise GoraError("the model has no trainable parameters; apply a plan with gorafit.apply_plan first")
    return groups


def create_optimizer(
    model: nn.Module,
    lr: float,
    lr_ratio: float = LR_RATIO_DEFAULT,
    lr_b_max: float | None = LR_B_MAX_DEFAULT,
    weight_decay: float = WEIGHT_DECAY_DEFAULT,
    optim: str | tuple[type[torch.optim.Optimizer], dict[str, Any]] = "adamw_torch",
) -> torch.optim.Optimizer:
    """The optimizer `gorafit run` trains with, for any training loop: ``lora_A`` (and a classification head)
    at ``lr``, every ``lora_B`` at ``min(lr_ratio * lr, lr_b_max)`` but not below ``lr``; no weight decay on
    biases and norms (the Trainer's rule).

    ``optim`` is a transformers optimizer name (``TrainingArguments.optim``, default AdamW) or an optimizer
    class with its keyword arguments, e.g. ``(torch.optim.AdamW, {"betas": (0.9, 0.95)})``.

    >>> model = gorafit.apply_plan(base_model, goraplan.load_plan("plan.gora"))          # doctest: +SKIP
    >>> optimizer = gorafit.create_optimizer(model, lr=2e-4)                               # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=args, optimizers=(optimizer, None), ...)       # doctest: +SKIP
    """
    if not lr > 0:
        raise GoraError(f"the learning rate must be above 0, not {lr}")
    if not lr_ratio > 0:
        raise GoraError(f"lr_ratio must be above 0, not {lr_ratio}")
    if lr_b_max is not None and not lr_b_max > 0:
        raise GoraError(f"lr_b_max must be above 0 (or None for no cap), not {lr_b_max}")
    groups = lora_plus_param_groups(model, lr, effective_lr_ratio(lr, lr_ratio, lr_b_max), weight_decay,
                                    decay_names=decay_parameter_names(model))
    optimizer_cls, kwargs = optimizer_class(optim, lr, model) if isinstance(optim, str) else optim
    unusable = {"params", "model", "optimizer_dict"} & set(kwargs)
    if unusable or not isinstance(optimizer_cls, type):
        name = optim if isinstance(optim, str) else getattr(optimizer_cls, "__name__", optimizer_cls)
        raise GoraError(
            f"optimizer {name!r} builds its own parameter groups, so the LoRA+ learning rates cannot be set; "
            "use an AdamW (adamw_torch)"
        )
    return optimizer_cls(groups, **{**kwargs, "lr": lr})


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The parameters the Trainer applies weight decay to (not biases, not norms): its own rule."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # reads nothing from the Trainer instance


def optimizer_class(name: str, lr: float, model: nn.Module | None = None) -> tuple[type, dict[str, Any]]:
    """A transformers optimizer name (``adamw_torch``, ``adamw_torch_fused``, ``sgd``, ...) -> its class and
    keyword arguments with transformers' defaults (betas, eps), as the Trainer looks them up.

    The lookup reads TrainingArguments' defaults without building a `TrainingArguments`, whose construction
    resets accelerate's process state (under a Trainer that is already set up, that would undo its set-up).

    >>> optimizer_class("adamw_torch", 1e-4)[0].__name__
    'AdamW'
    """
    import dataclasses
    import types

    from transformers import Trainer, TrainingArguments

    from goraplan.errors import first_line

    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**{**defaults, "optim": name, "learning_rate": lr})
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ValueError, ImportError, AttributeError) as exc:
        raise GoraError(f"optimizer {name!r} cannot be used ({first_line(exc)}); use adamw_torch") from None
