"""GoRA stage 2: ordinary LoRA training of a planned adapter with the Hugging Face `Trainer`.

`train` reads top to bottom like a recipe: settings -> run folder -> distributed set-up -> model ->
plan applied -> data -> Trainer -> train -> save (and check) the adapter -> ``run.json``.
Paper settings (GORA.md, stage 2): AdamW, cosine schedule with 3% warmup, every ``lora_B`` at
``lr_ratio`` (16) times the learning rate of ``lora_A`` (LoRA+). The parameter groups are built in
`GoraTrainer.create_optimizer`, which the Trainer calls under DDP, FSDP and DeepSpeed alike, so the
groups survive every launcher (the shipped DeepSpeed configs have no ``optimizer`` block).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from gorafit.apply import apply_plan, head_name
from gorafit.settings import TrainSettings, effective_lr_ratio, settings_json
from goraplan.build import peak_memory_mb
from goraplan.errors import GoraError
from goraplan.plan import Plan, load_plan, utc_now

__all__ = [
    "ADAPTER_DIR",
    "GoraTrainer",
    "RunResult",
    "deepspeed_config_path",
    "last_complete_checkpoint",
    "lora_plus_param_groups",
    "train",
    "verify_adapter",
]

ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
ADAPTER_FILE = "adapter_model.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LORA_B = re.compile(r"(^|\.)lora_B(\.|$)")
# What a run leaves in its folder: a folder holding any of these holds a run.
_RUN_ARTIFACTS = (RUN_FILE, LOG_FILE, ADAPTER_DIR, "runs")  # runs/: TensorBoard's event files


# ---------------------------------------------------------------------------------------------------- LoRA+
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


class GoraTrainer(Trainer):
    """A `transformers.Trainer` whose optimizer trains every ``lora_B`` at ``lr_ratio`` times the lr.

    >>> trainer = GoraTrainer(model=peft_model, args=TrainingArguments("out"), lr_ratio=16)  # doctest: +SKIP
    >>> [g["lr"] for g in trainer.create_optimizer().param_groups]                          # doctest: +SKIP
    """

    def __init__(self, *args: Any, lr_ratio: float = 16.0, **kwargs: Any):
        self.lr_ratio = lr_ratio
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = lora_plus_param_groups(
                opt_model,
                self.args.learning_rate,
                self.lr_ratio,
                self.args.weight_decay,
                decay_names=set(self.get_decay_parameter_names(opt_model)),
            )
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            unusable = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
            if unusable or not isinstance(optimizer_cls, type):
                raise GoraError(
                    f"optimizer {self.args.optim!r} builds its own parameter groups, so the LoRA+ learning rates "
                    "cannot be set; use an AdamW (--optim adamw_torch)"
                )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


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
            f.write(json.dumps(entry, default=float) + "\n")


# ---------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class RunResult:
    """What `train` produced: the run folder, the final adapter, the metrics and the full record."""

    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    record: dict[str, Any]
    is_main_process: bool = True


def train(
    plan: Plan | str | os.PathLike,
    settings: TrainSettings | None = None,
    *,
    plan_path: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> RunResult:
    """Train the adapter a GoRA plan describes and save it in ``<output_dir>/adapter``.

    ``plan`` is a `Plan` or the path of a ``.gora`` file (``plan_path`` names the file of a `Plan` given
    in Python, for the record). ``model`` / ``tokenizer`` replace loading the base model named in the plan
    (or ``settings.model``). Works unchanged under ``torchrun`` (DDP), with ``settings.fsdp`` and with ``settings.deepspeed``.

    >>> result = train("plan.gora", TrainSettings(data="sarcasm", max_steps=100))  # doctest: +SKIP
    >>> result.metrics["eval_loss"], result.adapter_dir                          # doctest: +SKIP
    """
    run_started = time.perf_counter()
    # ---- settings: the plan fills in what the user left open
    plan_path = Path(plan_path) if plan_path is not None else None
    if not isinstance(plan, Plan):
        plan_path = Path(plan)
        plan = load_plan(plan_path)
    settings = resolve_settings(settings or TrainSettings(), plan, plan_path)
    manifest = plan.manifest
    task = manifest.task
    out = Path(settings.output_dir)
    has_eval = settings.eval_data is not None or settings.eval_fraction > 0
    if (model is None) != (tokenizer is None):
        raise GoraError("pass both model and tokenizer to gorafit.train, or neither")

    # ---- run folder: refuse to mix two runs; find the checkpoint to resume from
    resume_from = check_output_dir(out, settings, plan)

    # ---- distributed set-up happens here (TrainingArguments initialises the process group)
    args = training_arguments(settings, task, has_eval=has_eval, resuming=resume_from is not None)
    state = _distributed_state(args)
    check_processes(state, settings)
    main = args.process_index == 0
    if main:
        if settings.overwrite_output_dir:
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            _drop_after(out, resume_from)
    _wait(state)

    # ---- model, with the plan applied (main process first: it may convert or download the model once)
    labels = manifest.labels
    if task == "seq-cls" and not labels:
        from goraplan.data import label_names_of, load_records

        labels = label_names_of(load_records(settings.data, settings.data_split))
    if model is None:
        from goraplan.models import resolve_model_path

        # A built-in model is converted into the cache once, by the main process; then every process loads it
        # at the same time (under ZeRO-3 loading partitions the weights, which takes all processes together).
        _main_first(state, lambda: resolve_model_path(settings.model))
        model, tokenizer = _load_base_model(settings, task, labels, manifest.settings.seed)
    peft_model = apply_plan(model, plan, check_fingerprint=not settings.ignore_fingerprint)

    # ---- data
    train_ds, eval_ds, data_info = _main_first(state, lambda: prepare_data(settings, tokenizer, task, labels))

    # ---- Trainer
    from goraplan.data import PaddingCollator

    trainer = GoraTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=PaddingCollator(tokenizer, task),
        compute_metrics=classification_accuracy if task == "seq-cls" else None,
        callbacks=[JsonLinesLogCallback(out / LOG_FILE), *callbacks],
        lr_ratio=effective_lr_ratio(settings.learning_rate, settings.lr_ratio, settings.lr_b_max),
    )
    check_launcher(trainer, settings)
    record = _run_record(plan, plan_path, settings, args, data_info, peft_model, resume_from)
    if main:
        _write_json(out / RUN_FILE, record)

    # ---- train
    started = time.perf_counter()
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except BaseException as exc:  # the record says the run did not finish, and why; --resume continues it
        if main:
            interrupted = isinstance(exc, KeyboardInterrupt)
            record.update(status="interrupted" if interrupted else "failed", finished_at=utc_now(),
                          error=f"{type(exc).__name__}: {exc}"[:500])
            _write_json(out / RUN_FILE, record)
        raise
    train_seconds = time.perf_counter() - started
    history = trainer.state.log_history
    final_eval = {}
    if eval_ds is not None:
        last_eval = next((e for e in reversed(history) if "eval_loss" in e), None)
        if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
            final_eval = {k: v for k, v in last_eval.items() if k.startswith("eval_")}
        else:
            final_eval = trainer.evaluate()

    # ---- save the adapter (every process takes part: FSDP and ZeRO-3 gather it) and check it on disk
    adapter_dir = out / ADAPTER_DIR
    trainer.save_model(str(adapter_dir))
    _wait(state)
    metrics = _metrics(history, output, final_eval, trainer.state.global_step)
    error = None
    if main:
        try:
            (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; run.json has every setting
            verify_adapter(adapter_dir, plan, head=head_name(model) if task == "seq-cls" else None)
        except GoraError as exc:  # raised after the others are released
            error = exc
            record.update(status="failed", finished_at=utc_now(), error=str(exc))
        else:
            _write_json(adapter_dir / "gora.json", {
                "plan_sha256": plan.sha256,
                "plan": str(plan_path) if plan_path else None,
                "base_model": settings.model,
                "task": task,
                "ranks": plan.ranks,
                "run": str(out),
            })
            record.update(status="completed", finished_at=utc_now(), adapter=ADAPTER_DIR)
        record.update(
            wall_time_s=round(time.perf_counter() - run_started, 3),
            train_time_s=round(train_seconds, 3),
            peak_memory_mb=round(peak_memory_mb(args.device), 1),
            global_step=trainer.state.global_step,
            parallelism=parallelism(trainer),
            metrics=metrics,
        )
        _write_json(out / RUN_FILE, record)
    _wait(state)
    if error is not None:
        raise error
    return RunResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, record=record, is_main_process=main)


# ---------------------------------------------------------------------------------------------------- settings
def resolve_settings(settings: TrainSettings, plan: Plan, plan_path: Path | None) -> TrainSettings:
    """Fill every setting left open (``None``) from the plan, so ``run.json`` records what was used."""
    manifest = plan.manifest
    data = settings.data if settings.data is not None else manifest.calibration.source
    if data is None:
        raise GoraError("the plan records no data source (it was built from batches in Python); pass --data")
    if settings.data_split is not None:
        data_split = settings.data_split
    elif settings.data is None and manifest.calibration.split:
        data_split = manifest.calibration.split
    else:
        data_split = "train"
    eval_split = settings.eval_split
    if settings.eval_data is not None and eval_split is None:
        from goraplan.data import list_splits

        eval_split = "test" if "test" in list_splits(settings.eval_data) else "train"
    stem = plan_path.stem if plan_path is not None else "gora"
    return settings.model_copy(update={
        "model": settings.model or manifest.base_model.name_or_path,
        "data": data,
        "data_split": data_split,
        "eval_split": eval_split,
        "max_length": settings.max_length or manifest.settings.max_length,
        "seed": settings.seed if settings.seed is not None else manifest.settings.seed,
        "output_dir": settings.output_dir or str(Path("runs") / stem),
        "per_device_eval_batch_size": settings.per_device_eval_batch_size or settings.per_device_train_batch_size,
        "eval_steps": settings.eval_steps if settings.eval_steps is not None else 0.1,
    })


def _steps(value: float) -> float | int:
    """TrainingArguments wants whole step counts as ints and shares of the run as floats below 1."""
    return int(value) if value >= 1 and float(value).is_integer() else value


def training_arguments(settings: TrainSettings, task: str, *, has_eval: bool, resuming: bool) -> TrainingArguments:
    """The `TrainingArguments` of a run (initialises torch.distributed under torchrun)."""
    out = Path(settings.output_dir)
    fsdp, fsdp_config = fsdp_arguments(settings.fsdp, settings.fsdp_config)
    kwargs: dict[str, Any] = dict(
        output_dir=str(out),
        learning_rate=settings.learning_rate,
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
        remove_unused_columns=False,
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
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or ["no details"])[0]
        raise GoraError(f"invalid training arguments: {first}") from None


def _cpu_only() -> bool:
    """No GPU or other accelerator that accelerate would pick."""
    if torch.cuda.is_available():
        return False
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def report_to(spec: str) -> list[str]:
    """``auto``: TensorBoard when it is installed, else nothing; ``none``; or a comma list of integrations."""
    spec = spec.strip()
    if spec == "auto":
        from transformers.integrations import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else []
    if spec in ("none", ""):
        return []
    return [s.strip() for s in spec.split(",") if s.strip()]


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
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GoraError(f"FSDP config file {config} is not valid JSON ({exc})") from None
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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GoraError(f"DeepSpeed config {path} is not valid JSON ({exc})") from None
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


def check_processes(state, settings: TrainSettings) -> None:
    """FSDP needs several processes on accelerators: say so before any model is loaded."""
    from accelerate.utils import DistributedType

    if settings.fsdp is None:
        return
    kind = getattr(state, "distributed_type", DistributedType.NO)
    if kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        processes = getattr(state, "num_processes", 1)
        raise GoraError(
            f"--fsdp needs several processes on GPUs (accelerate runs FSDP on accelerators only) but this run has "
            f"{processes} process{'es' if processes > 1 else ''} on {'CPUs' if kind == DistributedType.MULTI_CPU else 'one device'}; "
            "launch with torchrun on GPUs, or drop --fsdp to train with DDP"
        )


def check_launcher(trainer: Trainer, settings: TrainSettings) -> None:
    """FSDP or DeepSpeed asked for but not set up by accelerate is an error, never a silent fallback to DDP.

    accelerate runs FSDP only on accelerators (GPU, XPU, NPU, ...): several CPU processes train as DDP.
    """
    if settings.fsdp is not None and not trainer.is_fsdp_enabled:
        where = f"{trainer.args.world_size} process(es) on {trainer.args.device.type}"
        raise GoraError(
            f"--fsdp needs several processes on GPUs (accelerate runs FSDP on accelerators only) but this run has "
            f"{where}; launch with torchrun on GPUs, or drop --fsdp to train with DDP"
        )
    if settings.deepspeed is not None and not trainer.is_deepspeed_enabled:
        raise GoraError("--deepspeed was given but accelerate did not set DeepSpeed up; launch with torchrun or deepspeed")


# ---------------------------------------------------------------------------------------------------- run folder
def holds_run(folder: Path) -> bool:
    """True when ``folder`` holds (part of) a gorafit run: run.json, log, adapter or checkpoints."""
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in _RUN_ARTIFACTS) or bool(_checkpoints(folder))


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` that was written to the end (its trainer state is the last file written).

    A process killed while writing a checkpoint leaves it partial; that one is skipped.
    """
    for _, path in reversed(_checkpoints(Path(folder))):
        if (path / "trainer_state.json").is_file() and (path / ADAPTER_FILE).is_file():
            return path
    return None


def check_output_dir(out: Path, settings: TrainSettings, plan: Plan) -> Path | None:
    """Refuse to mix two runs in one folder; with ``resume``, the checkpoint to continue from."""
    if settings.resume:
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is None:
            raise GoraError(
                f"there is no complete checkpoint in {out} to resume from; run without --resume to start afresh"
            )
        record_path = out / RUN_FILE
        if record_path.is_file():
            try:
                recorded = json.loads(record_path.read_text(encoding="utf-8")).get("plan", {}).get("sha256")
            except (json.JSONDecodeError, AttributeError):
                recorded = None
            if recorded and plan.sha256 and recorded != plan.sha256:
                raise GoraError(
                    f"the run in {out} was trained from another plan (sha256 {recorded[:12]}...); resume it with "
                    "that plan, or choose another --output-dir"
                )
        return checkpoint
    if holds_run(out) and not settings.overwrite_output_dir:
        raise GoraError(
            f"output folder {out} holds another run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output-dir"
        )
    if out.exists() and not out.is_dir():
        raise GoraError(f"output path {out} is a file; give a folder with --output-dir")
    return None


def clear_run(out: Path) -> None:
    """Remove what a previous run left (and nothing else the folder may hold)."""
    for name in _RUN_ARTIFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for _, path in _checkpoints(out):
        shutil.rmtree(path)


def _drop_after(out: Path, checkpoint: Path) -> None:
    """Before resuming: remove partial checkpoints newer than ``checkpoint`` and log lines after its step."""
    step = int(_CHECKPOINT.match(checkpoint.name).group(1))
    for n, path in _checkpoints(out):
        if n > step:
            shutil.rmtree(path)
    log = out / LOG_FILE
    if log.is_file():
        kept = [line for line in log.read_text(encoding="utf-8").splitlines() if _log_step(line) <= step]
        log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # an unreadable (half-written) line goes


# ---------------------------------------------------------------------------------------------------- model, data
def _load_base_model(settings: TrainSettings, task: str, labels: list[str] | None, plan_seed: int):
    from goraplan.models import load_model

    # The seed of a newly initialised classification head is the plan's: the head the gradients were taken with.
    return load_model(
        settings.model,
        task,
        dtype=settings.dtype,
        label_names=labels if task == "seq-cls" else None,
        trust_remote_code=settings.trust_remote_code,
        device="cpu",  # the Trainer places it (one device per process)
        seed=plan_seed,
    )


def prepare_data(settings: TrainSettings, tokenizer, task: str, labels: list[str] | None):
    """Tokenized train and eval sets (eval held out of the train data unless ``eval_data`` is given)."""
    from goraplan.data import prepare, split_train_eval

    common = dict(max_length=settings.max_length, seed=settings.seed, label_names=labels if task == "seq-cls" else None)
    train_ds, info = prepare(settings.data, tokenizer, task, split=settings.data_split,
                             limit=settings.max_train_samples, **common)
    eval_ds = None
    if settings.eval_data is not None:
        eval_ds, _ = prepare(settings.eval_data, tokenizer, task, split=settings.eval_split,
                             limit=settings.max_eval_samples, **common)
    elif settings.eval_fraction > 0:
        train_ds, eval_ds = split_train_eval(train_ds, settings.eval_fraction, settings.seed)
        if settings.max_eval_samples is not None:
            eval_ds = eval_ds.select(range(min(settings.max_eval_samples, len(eval_ds))))
    if len(train_ds) == 0:
        raise GoraError(f"no training examples are left in {settings.data}; give more data or a larger --max-length")
    data_info = {
        "source": info.source,
        "split": info.split,
        "format": info.format,
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds) if eval_ds is not None else 0,
        "eval_source": settings.eval_data or (f"{settings.eval_fraction:g} of {settings.data}" if eval_ds else None),
        "label_names": info.label_names,
    }
    return train_ds, eval_ds, data_info


# ---------------------------------------------------------------------------------------------------- checks
def verify_adapter(adapter_dir: Path, plan: Plan, *, head: str | None = None) -> dict[str, tuple[int, ...]]:
    """Check a saved adapter on disk: every planned ``lora_A`` / ``lora_B`` present with its planned shape
    (and the classification head, for seq-cls). Under FSDP or ZeRO-3 an adapter saved without gathering
    is empty or sharded; that is an error, never a silent success.

    >>> verify_adapter(Path("runs/plan/adapter"), load_plan("plan.gora"))  # doctest: +SKIP
    """
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.is_file():
        raise GoraError(f"the adapter was not saved: {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    problems = []
    for entry in plan.manifest.modules:
        out_f, in_f = entry.shape
        for kind, shape in (("lora_A", (entry.rank, in_f)), ("lora_B", (out_f, entry.rank))):
            key = f"base_model.model.{entry.name}.{kind}.weight"
            if key not in shapes:
                problems.append(f"{key} is missing")
            elif shapes[key] != shape:
                problems.append(f"{key} has shape {list(shapes[key])}, planned {list(shape)}")
    if head is not None and not any(k.startswith(f"base_model.model.{head}.") for k in shapes):
        problems.append(f"the classification head {head} is missing")
    if problems:
        raise GoraError(
            f"the saved adapter {path} is incomplete ({len(problems)} problems; first: {problems[0]}); under FSDP "
            "use FULL_STATE_DICT, under ZeRO-3 set stage3_gather_16bit_weights_on_model_save"
        )
    return shapes


# ---------------------------------------------------------------------------------------------------- records
def _metrics(history: list[dict], output, final_eval: dict, global_step: int) -> dict[str, Any]:
    losses = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    start = next((e for e in evals if e.get("step") == 0), None)
    metrics: dict[str, Any] = {
        "global_step": global_step,
        "train_loss": losses[-1]["loss"] if losses else None,  # the last logged training loss
        "train_loss_mean": output.training_loss,  # mean over the steps of this call (after a resume: those)
        "eval_loss_start": start["eval_loss"] if start else None,
        "eval_loss": final_eval.get("eval_loss"),
    }
    if start and "eval_accuracy" in start:
        metrics["eval_accuracy_start"] = start["eval_accuracy"]
    if "eval_accuracy" in final_eval:
        metrics["eval_accuracy"] = final_eval["eval_accuracy"]
    return metrics


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


def library_versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    names = ("goraplan", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "deepspeed")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _run_record(plan: Plan, plan_path, settings, args: TrainingArguments, data_info, peft_model, resume_from):
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {
        "status": "running",
        "started_at": utc_now(),
        "plan": {
            "path": str(plan_path) if plan_path else None,
            "sha256": plan.sha256,
            "base_model": plan.manifest.base_model.name_or_path,
            "task": plan.manifest.task,
            "modules": len(plan.manifest.modules),
            "allocated_params": plan.manifest.totals.allocated,
            "lora_equivalent_params": plan.manifest.totals.lora_equivalent,
        },
        "plan_sha256": plan.sha256,
        "labels": plan.manifest.labels,
        "settings": settings_json(settings),
        "lora_B_learning_rate": settings.learning_rate
        * effective_lr_ratio(settings.learning_rate, settings.lr_ratio, settings.lr_b_max),
        "training_arguments": json.loads(args.to_json_string()),
        "world_size": args.world_size,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "trainable_params": trainable,
        "data": data_info,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "versions": library_versions(),
        "machine": machine(),
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- processes
def _distributed_state(args: TrainingArguments):
    """Accelerate's state of this process (reading ``args.device`` sets it up, and the process group)."""
    _ = args.device
    return getattr(args, "distributed_state", None)


def _wait(state) -> None:
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()


def _main_first(state, work: Callable[[], Any]) -> Any:
    """Run ``work`` on the main process, then on the others (which then find its caches). An error on the
    main process does not leave the others waiting: they run ``work`` too, and meet the same error."""
    if state is None or state.num_processes <= 1:
        return work()
    result, error = None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as exc:  # re-raised below, after the others are released
            error = exc
    state.wait_for_everyone()
    if not state.is_main_process:
        result = work()
    if error is not None:
        raise error
    return result

