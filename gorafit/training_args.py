"""gorafit's settings -> Hugging Face `TrainingArguments`: FSDP, DeepSpeed, reporting, the process layout.

Every `TrainSettings` field maps onto a `TrainingArguments` field here; any other `TrainingArguments` field
given in ``settings.training_arguments`` is passed through as given and validated by transformers itself.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from gorafit.settings import TrainSettings
from goraplan.errors import GoraError, first_line
from goraplan.untrusted import read_json_object

__all__ = [
    "check_launcher",
    "check_processes",
    "deepspeed_config_path",
    "fsdp_arguments",
    "parallelism",
    "report_to",
    "training_arguments",
]


def training_arguments(settings: TrainSettings, task: str, *, has_eval: bool, resuming: bool) -> TrainingArguments:
    """The `TrainingArguments` of a run (initialises torch.distributed under torchrun).

    An invalid combination (transformers' own checks) is one `GoraError` sentence.
    """
    fsdp, fsdp_config = fsdp_arguments(settings.fsdp, settings.fsdp_config)
    kwargs: dict[str, Any] = dict(
        output_dir=str(Path(settings.output_dir)),
        # --lr auto: the recipe sets the chosen lr here after its range test (recipe._auto_learning_rate)
        learning_rate=settings.learning_rate if settings.learning_rate != "auto" else 0.0,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        per_device_eval_batch_size=settings.per_device_eval_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float below 1 is the warmup ratio
        lr_scheduler_type=settings.lr_scheduler_type,
        max_grad_norm=settings.max_grad_norm,
        optim=settings.optim,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_epsilon=settings.adam_epsilon,
        seed=settings.seed,
        data_seed=settings.seed,  # the data order depends on the seed alone, so a resumed run sees the same batches
        bf16=settings.bf16,
        fp16=settings.fp16,
        activation_checkpointing=settings.gradient_checkpointing,
        logging_steps=_steps(settings.logging_steps),
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=_steps(settings.eval_steps) if has_eval else None,
        eval_on_start=has_eval and settings.eval_on_start and not resuming,
        prediction_loss_only=task == "causal-lm",  # no full-vocabulary logits kept in memory for eval
        save_strategy="steps",
        save_steps=_steps(settings.save_steps),
        save_total_limit=settings.save_total_limit,
        report_to=report_to(settings.report_to),
        disable_tqdm=settings.disable_tqdm,
        dataloader_num_workers=settings.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator needs every column the data preparation made
        label_names=["labels"],
        fsdp=fsdp,
        fsdp_config=fsdp_config,
        deepspeed=deepspeed_config_path(settings.deepspeed) if settings.deepspeed else None,
    )
    if _cpu_only() and not settings.deepspeed:
        # accelerate sets DDP over gloo up for several CPU processes (torchrun), and allows bf16 on the CPU,
        # only when told that the CPU is the device
        kwargs["use_cpu"] = True
    if settings.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(settings.training_arguments)
    check_packages(kwargs["report_to"], kwargs["optim"])
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError, ImportError) as exc:
        raise GoraError(f"invalid training arguments: {first_line(exc)}") from None


def _steps(value: float) -> float | int:
    """TrainingArguments wants whole step counts as ints and shares of the run as floats below 1."""
    return int(value) if value >= 1 and float(value).is_integer() else value


def _cpu_only() -> bool:
    """No GPU or other accelerator that accelerate would pick."""
    if torch.cuda.is_available():
        return False
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def report_to(spec: str | list[str]) -> list[str]:
    """``auto``: TensorBoard when it is installed, else nothing; ``none``; or a list (or comma list) of
    integrations.

    >>> report_to("none"), report_to("wandb, tensorboard"), report_to(["wandb"])
    ([], ['wandb', 'tensorboard'], ['wandb'])
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "auto":
            from transformers.integrations import is_tensorboard_available

            return ["tensorboard"] if is_tensorboard_available() else []
        spec = spec.split(",")
    names = [s.strip() for s in spec if s.strip()]
    return [] if names in ([], ["none"]) else names


# pip names of the reporting integrations whose package is not called as the integration is
_REPORTER_PACKAGES = {"neptune": "neptune", "flyte": "flytekit", "dagshub": "dagshub mlflow", "kubeflow": "kubeflow"}


def check_packages(report: str | list[str], optim: str) -> None:
    """``--report-to`` and ``--optim`` may name packages that are not installed: one sentence before any
    model is loaded, instead of transformers' traceback when the Trainer is made or starts."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = report if isinstance(report, list) else [report]
    available = get_available_reporting_integrations()
    for name in names:
        if name in INTEGRATION_TO_CALLBACK and name not in available:
            raise GoraError(
                f"--report-to {name} needs the {name} package, which is not installed: pip install "
                f"{_REPORTER_PACKAGES.get(name, name)}, or report to {', '.join(available) or 'none'} instead"
            )
    try:
        Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(output_dir="unused", optim=optim, report_to=[]), None)
    except ImportError as exc:
        raise GoraError(f"--optim {optim} needs a package that is not installed ({first_line(exc)}); install it, "
                        "or use adamw_torch") from None
    except (ValueError, TypeError, AttributeError):  # needs the model (e.g. its target modules): checked later
        pass


def launch_warning() -> str | None:
    """A warning when a launch that asked for several processes runs as one.

    ``accelerate launch --cpu --num_processes N`` uses accelerate's simple launcher: it starts one process
    (no ``WORLD_SIZE``) but sets ``MASTER_ADDR`` for the group it meant. Several processes on CPUs come from
    ``accelerate launch --multi_gpu --num_processes N`` (torchrun underneath; gloo on CPUs) or torchrun.
    """
    asked_for_group = "MASTER_ADDR" in os.environ and any(k.startswith("ACCELERATE_") for k in os.environ)
    if not asked_for_group or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return ("warning: this run was launched for several processes but runs as one (accelerate launch --cpu starts a "
            "single process whatever --num_processes says); for N processes on CPUs use accelerate launch --multi_gpu "
            "--num_processes N, or torchrun --nproc-per-node N")


def fsdp_arguments(spec: str | None, config: dict | str | None) -> tuple[bool, dict | None]:
    """``--fsdp "full_shard offload"`` and ``--fsdp-config`` -> TrainingArguments' (fsdp, fsdp_config), FSDP2.

    The adapter must be saved whole, so the state dict type stays ``FULL_STATE_DICT``.
    """
    if spec is None:
        return False, None
    if isinstance(config, str):
        path = Path(config)
        if not path.is_file():
            raise GoraError(f"FSDP config file {config} does not exist")
        config = read_json_object(path, "FSDP config file")
    merged = {k.removeprefix("fsdp_"): v for k, v in (config or {}).items()}
    options = spec.replace(",", " ").split() or ["full_shard"]
    merged.setdefault("version", 2)
    if "offload" in options:
        merged["cpu_offload"] = True
    if "shard_grad_op" in options:
        merged["reshard_after_forward"] = False
    state_dict_type = merged.setdefault("state_dict_type", "FULL_STATE_DICT")
    if state_dict_type != "FULL_STATE_DICT":
        raise GoraError(
            f"FSDP state_dict_type {state_dict_type!r} would save a sharded adapter; gorafit saves the whole "
            "adapter: use FULL_STATE_DICT"
        )
    return True, merged


def deepspeed_config_path(spec: str) -> str:
    """``zero2`` / ``zero3`` -> the config shipped with gorafit; otherwise a JSON file, checked.

    A config with an ``optimizer`` block would replace gorafit's LoRA+ parameter groups, and a ZeRO-3
    config must gather the weights to save a whole adapter: both are refused before any work.

    >>> Path(deepspeed_config_path("zero3")).name  # doctest: +SKIP
    'zero3.json'
    """
    if spec in ("zero2", "zero3"):
        path = Path(str(importlib.resources.files("gorafit") / "configs" / f"{spec}.json"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise GoraError(f"DeepSpeed config {spec} does not exist; give a JSON file, or zero2 / zero3")
    config = read_json_object(path, "DeepSpeed config")
    if "optimizer" in config:
        raise GoraError(
            f"DeepSpeed config {path} has an optimizer block, which would replace the LoRA+ learning rates "
            "(lora_B at lr-ratio x lr); remove the block and set the optimizer with gorafit's options"
        )
    zero = config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise GoraError(
            f"DeepSpeed config {path} uses ZeRO-3 without stage3_gather_16bit_weights_on_model_save, so the "
            "saved adapter would be empty; set it to true"
        )
    if importlib.util.find_spec("deepspeed") is None:
        raise GoraError("--deepspeed needs the deepspeed package: pip install deepspeed")
    return str(path)


_FSDP_NEEDS_GPUS = ("--fsdp needs several processes on GPUs (accelerate runs FSDP on accelerators only) but this run "
                    "has {where}; launch with torchrun on GPUs, or drop --fsdp to train with DDP")


def check_processes(args: TrainingArguments, settings: TrainSettings) -> None:
    """FSDP needs several processes on accelerators: say so before any model is loaded."""
    from accelerate.utils import DistributedType

    state = getattr(args, "distributed_state", None)
    if settings.fsdp is None:
        return
    kind = getattr(state, "distributed_type", DistributedType.NO)
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        processes = getattr(state, "num_processes", 1)
        where = (f"{processes} process{'es' if processes > 1 else ''} on "
                 f"{'CPUs' if kind == DistributedType.MULTI_CPU else 'one device'}")
        raise GoraError(_FSDP_NEEDS_GPUS.format(where=where))


def check_launcher(trainer: Trainer, settings: TrainSettings) -> None:
    """FSDP or DeepSpeed asked for but not set up by accelerate is an error, never a silent fallback to DDP.

    accelerate runs FSDP only on accelerators (GPU, XPU, NPU, ...): several CPU processes train as DDP.
    """
    if settings.fsdp is not None and not trainer.is_fsdp_enabled:
        raise GoraError(_FSDP_NEEDS_GPUS.format(where=f"{trainer.args.world_size} process(es) on "
                                                      f"{trainer.args.device.type}"))
    if settings.deepspeed is not None and not trainer.is_deepspeed_enabled:
        raise GoraError("--deepspeed was given but accelerate did not set DeepSpeed up; launch with torchrun or deepspeed")


def parallelism(trainer: Trainer) -> dict[str, Any]:
    """How the run was spread over processes, as the Trainer actually did it (not as asked)."""
    args = trainer.args
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        mode = f"deepspeed-zero{stage}"
    elif trainer.is_fsdp_enabled:
        mode = f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    elif args.world_size > 1:
        mode = "ddp"
    else:
        mode = "single"
    info: dict[str, Any] = {"mode": mode, "world_size": args.world_size, "device": str(args.device)}
    if trainer.is_fsdp_enabled:
        from torch.distributed.fsdp import FSDPModule

        info["fsdp_sharded_modules"] = sum(isinstance(m, FSDPModule) for m in trainer.model_wrapped.modules())
    return info
