"""What ``run.json`` says about a run: the plan it came from, every setting, the data, the outcome.

The record is written when training starts (status ``running``), and again when it ends (``completed``,
``failed`` or ``interrupted``, with the metrics); `gorafit.run_folder` reads and writes the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainingArguments

from gorafit.optim import effective_lr_ratio
from gorafit.run_folder import ADAPTER_DIR
from gorafit.settings import TrainSettings, settings_json
from goraplan.plan import Plan, utc_now
from goraplan.provenance import library_versions, machine

__all__ = ["failed", "finished", "new_record", "training_metrics"]

RECORDED_PACKAGES = ("goraplan", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "deepspeed")


def new_record(plan: Plan, plan_path: Path | None, settings: TrainSettings, args: TrainingArguments,
               data_info: dict[str, Any], labels: list[str] | None, model: nn.Module,
               resume_from: Path | None) -> dict[str, Any]:
    """The record of a run that is starting."""
    manifest = plan.manifest
    return {
        "status": "running",
        "started_at": utc_now(),
        "plan": {
            "path": str(plan_path) if plan_path else None,
            "sha256": plan.sha256,
            "base_model": manifest.base_model.name_or_path,
            "task": manifest.task,
            "labels": labels,
            "modules": len(manifest.modules),
            "allocated_params": manifest.totals.allocated,
            "lora_equivalent_params": manifest.totals.lora_equivalent,
        },
        "settings": settings_json(settings),
        "lora_B_learning_rate": settings.learning_rate
        * effective_lr_ratio(settings.learning_rate, settings.lr_ratio, settings.lr_b_max),
        "training_arguments": json.loads(args.to_json_string()),
        "world_size": args.world_size,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data": data_info,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "versions": library_versions(RECORDED_PACKAGES),
        "machine": machine(),
    }


def failed(record: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The record of a run that stopped with ``exc`` (Ctrl-C: interrupted); ``--resume`` continues it."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    return {**record, "status": status, "finished_at": utc_now(), "error": f"{type(exc).__name__}: {exc}"[:500]}


def finished(record: dict[str, Any], error: Exception | None, *, metrics: dict[str, Any], wall_time_s: float,
             train_time_s: float, peak_memory_mb: float, global_step: int, parallelism: dict[str, Any]) -> dict[str, Any]:
    """The record of a run that trained to the end: completed with its adapter, or failed (the saved adapter
    did not check out), with the metrics, times and memory."""
    outcome = {"status": "failed", "error": str(error)} if error else {"status": "completed", "adapter": ADAPTER_DIR}
    return {**record, **outcome, "finished_at": utc_now(), "wall_time_s": round(wall_time_s, 3),
            "train_time_s": round(train_time_s, 3), "peak_memory_mb": round(peak_memory_mb, 1),
            "global_step": global_step, "parallelism": parallelism, "metrics": metrics}


def training_metrics(history: list[dict], training_loss: float, final_eval: dict, global_step: int) -> dict[str, Any]:
    """The numbers a run is judged by: last and mean train loss, eval loss (and accuracy) at start and end."""
    losses = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    start = next((e for e in evals if e.get("step") == 0), None)
    metrics: dict[str, Any] = {
        "global_step": global_step,
        "train_loss": losses[-1]["loss"] if losses else None,  # the last logged training loss
        "train_loss_mean": training_loss,  # mean over the steps of this call (after a resume: those)
        "eval_loss_start": start["eval_loss"] if start else None,
        "eval_loss": final_eval.get("eval_loss"),
    }
    if start and "eval_accuracy" in start:
        metrics["eval_accuracy_start"] = start["eval_accuracy"]
    if "eval_accuracy" in final_eval:
        metrics["eval_accuracy"] = final_eval["eval_accuracy"]
    return metrics
