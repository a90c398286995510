"""The Hugging Face `Trainer` pieces of `gorafit run`: the LoRA+ Trainer, the log file, the accuracy metric."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from gorafit.optim import LR_RATIO_DEFAULT, create_optimizer
from goraplan.errors import GoraError
from goraplan.files import json_dumps
from goraplan.plan import utc_now

__all__ = ["GoraTrainer", "JsonLinesLogCallback", "StopOnNonFiniteLoss", "classification_accuracy"]


class GoraTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer is `gorafit.create_optimizer`'s: every ``lora_B`` at
    ``lr_ratio`` times the lr, capped at ``lr_b_max`` when one is given (`gorafit run` gives its
    ``--lr-b-max``). The Trainer calls `create_optimizer` under DDP, FSDP and DeepSpeed alike, so the groups
    survive every launcher.

    >>> trainer = GoraTrainer(model=peft_model, args=TrainingArguments("out"), lr_ratio=16)  # doctest: +SKIP
    >>> [g["lr"] for g in trainer.create_optimizer().param_groups]                          # doctest: +SKIP
    """

    def __init__(self, *args: Any, lr_ratio: float = LR_RATIO_DEFAULT, lr_b_max: float | None = None,
                 **kwargs: Any):
        self.lr_ratio = lr_ratio
        self.lr_b_max = lr_b_max
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            optim = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = create_optimizer(opt_model, self.args.learning_rate, self.lr_ratio, self.lr_b_max,
                                              self.args.weight_decay, optim=optim)
        return self.optimizer

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Every entry that has the learning rate (the first group's: A's) also gets ``learning_rate_B``, the
        rate lora_B trains at (what decides a collapse), for log.jsonl, TensorBoard and any other reporter."""
        if "learning_rate" in logs and self.optimizer is not None:
            ratio = group_lr_ratio(self.optimizer, "lora_B")
            if ratio is not None:
                logs = {**logs, "learning_rate_B": logs["learning_rate"] * ratio}
        super().log(logs, *args, **kwargs)


def group_lr_ratio(optimizer: torch.optim.Optimizer, group: str) -> float | None:
    """How many times the first group's learning rate the group named `group` (or its no-decay twin) trains
    at. The schedule scales every group alike, so the ratio of their starting rates holds at every step
    (and the Trainer logs the first group's rate as it was for the step, before the scheduler moved on)."""
    first = optimizer.param_groups[0]
    for param_group in optimizer.param_groups:
        if param_group.get("name") in (group, f"{group}_no_decay"):
            base = first.get("initial_lr", first["lr"])
            return param_group.get("initial_lr", param_group["lr"]) / base if base else None
    return None


def classification_accuracy(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for seq-cls: the share of examples whose arg-max logit is the label."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    labels = eval_pred.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


class JsonLinesLogCallback(TrainerCallback):
    """Appends every log entry (loss, lr, eval loss, accuracy, ...) to ``log.jsonl``, one JSON object a line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        entry = {"step": state.global_step, "epoch": state.epoch, **logs, "time": utc_now()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json_dumps(_plain(entry)) + "\n")  # strict JSON: a NaN loss is written as null


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """numpy and torch scalars as Python numbers, so that a non-finite one is seen (and written as null)."""
    return {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for k, v in entry.items()}


class StopOnNonFiniteLoss(TrainerCallback):
    """Stops the run with one sentence when the training or eval loss is no longer a finite number: every
    step after it would only train a NaN adapter (the record says "failed", with this sentence)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, float | int) and not math.isfinite(value):
                raise GoraError(f"the {key.replace('_', ' ')} became {value} at step {state.global_step}, so the "
                                "adapter would be no use: lower --lr (or --lr-ratio, --lr-b-max), or train in float32")
