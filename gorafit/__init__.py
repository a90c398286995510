"""gorafit: GoRA stage two. Train the adapter a `.gora` plan describes, then export it.

Add GoRA to your own training loop (a plain Trainer, TRL, a hand-written loop): the plan's adapter, and the
LoRA+ optimizer `gorafit run` trains it with:

>>> from gorafit import apply_plan, create_optimizer
>>> model = apply_plan(model, goraplan.load_plan("plan.gora"))   # doctest: +SKIP
>>> optimizer = create_optimizer(model, lr=1e-4)                # doctest: +SKIP

Or let gorafit run the whole recipe (HF Trainer, LoRA+ learning rates, DDP / FSDP / DeepSpeed):

>>> from gorafit import TrainSettings, train
>>> result = train("plan.gora", TrainSettings(max_steps=200))    # doctest: +SKIP
>>> result.adapter_dir                                          # doctest: +SKIP
PosixPath('runs/plan/adapter')

Names are imported on first use, so ``import gorafit`` (and ``gorafit --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gorafit.apply import apply_plan, lora_config_for
    from gorafit.optim import create_optimizer
    from gorafit.recipe import RunResult, train
    from gorafit.settings import TrainSettings
    from gorafit.trainer import GoraTrainer

# public name -> the module that defines it
_HOMES = {
    "apply_plan": "gorafit.apply",
    "lora_config_for": "gorafit.apply",
    "create_optimizer": "gorafit.optim",
    "train": "gorafit.recipe",
    "RunResult": "gorafit.recipe",
    "TrainSettings": "gorafit.settings",
    "GoraTrainer": "gorafit.trainer",
}

__all__ = ["GoraTrainer", "RunResult", "TrainSettings", "apply_plan", "create_optimizer", "lora_config_for", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'gorafit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
