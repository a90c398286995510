"""Every setting of `gorafit run`, validated up front and recorded in the run folder's ``run.json``.

Names follow Hugging Face ``TrainingArguments`` wherever one exists, so a ``train.yaml`` reads like the
arguments people already know, and any other ``TrainingArguments`` field (``warmup_steps``,
``load_best_model_at_end``, ``report_to``, ...) is accepted beside gorafit's own settings and handed to
transformers, which validates it. ``None`` means "take it from the plan" (model, data, max length, seed).
The `gorafit run` options are generated from `TrainSettings` (goraplan.cli_options).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gorafit.optim import (
    LR_B_MAX_DEFAULT,
    LR_DEFAULT,
    LR_RATIO_DEFAULT,
    WEIGHT_DECAY_DEFAULT,
    effective_lr_ratio,
)
from goraplan.errors import GoraError, first_line
from goraplan.settings import validation_summary

__all__ = ["SETTING_ALIASES", "TrainSettings", "load_config_file", "make_train_settings"]

# docs/method.md §10: GoRA trained stably in the quality benchmark at B learning rates up to this and
# learning rates up to MEASURED_STABLE_LR; beyond either, `gorafit run` warns.
MEASURED_STABLE_B_LR = 5e-3
MEASURED_STABLE_LR = 1e-3

# Short names accepted in a config file as on the command line (--lr, --epochs, ...).
SETTING_ALIASES = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "overwrite": "overwrite_output_dir",
}
DType = Literal["float32", "bfloat16", "float16"]
FsdpOption = Literal["full_shard", "shard_grad_op", "offload", "auto_wrap"]
FSDP_OPTIONS: tuple[str, ...] = typing.get_args(FsdpOption)


class TrainSettings(BaseModel):
    """Settings of `gorafit run` (GoRA stage 2): gorafit's own, and any other ``TrainingArguments`` field.

    A key that is neither is an error; a ``TrainingArguments`` field that is not a gorafit setting lands in
    ``training_arguments`` and reaches transformers as given.

    >>> TrainSettings(learning_rate=2e-4).lr_ratio
    16.0
    >>> TrainSettings(warmup_steps=10, run_name="a").training_arguments
    {'warmup_steps': 10, 'run_name': 'a'}
    >>> TrainSettings(lr=3e-4).learning_rate
    0.0003
    """

    # NaN or infinity in a number (YAML ``.inf``) is refused: a run would "complete" with a NaN adapter.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # -- base model
    model: str | None = Field(None, description="Base model (Hub id, folder or built-in alias); default: the plan's.")
    revision: str | None = Field(None, description="Branch, tag or commit of a Hub model; default: the commit the "
                                 "plan records, when the model is the plan's.")
    dtype: DType = Field("float32", description="dtype the base model is loaded in.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub.")
    ignore_fingerprint: bool = Field(False, description="Train even if the base weights differ from the ones the "
                                     "plan was built on.")

    # -- data
    data: str | None = Field(None, description="Training data (alias, jsonl/json/csv/parquet file, folder, Hub name); "
                             "default: the plan's calibration data.")
    data_split: str | None = Field(None, description="Split of --data; default: the plan's split, or train.")
    eval_data: str | None = Field(None, description="Evaluation data; default: hold out --eval-fraction of --data.")
    eval_split: str | None = Field(None, description="Split of --eval-data; default: test when it has one, else train.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of --data held out for evaluation when there "
                                 "is no --eval-data; 0: none.")
    max_length: int | None = Field(None, ge=2, description="Tokens per example at most; default: the plan's.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many examples of --data (before "
                                          "the eval share is held out).")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many eval examples.")
    columns: dict[str, str] | str | None = Field(
        None, description="Read your data set's columns as the standard ones: STANDARD=YOURS,... (e.g. "
        "prompt=question,completion=answer), or a mapping in a config file.")
    packing: bool = Field(False, description="Pack several causal-lm examples into each --max-length row (each "
                          "still attends only to itself).")

    # -- run folder
    output_dir: str | None = Field(None, description="Run folder; default: runs/<plan name>.")
    overwrite_output_dir: bool = Field(False, description="Replace a previous run in the output folder.")
    resume: bool = Field(False, description="Continue from the last complete checkpoint in the output folder.")

    # -- optimisation (paper: AdamW, cosine, 3% warmup, B at 16 x the lr of A; docs/method.md §6)
    learning_rate: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        LR_DEFAULT, description="Peak learning rate of lora_A and the head, or auto: a short range test on training "
        "batches picks it, or keeps the default when it sees no learning or the run is too short for it (under about "
        "100 steps); at most about 10% of the run's cost, evidence in the run folder (gorafit.lr_finder).")
    lr_ratio: float = Field(LR_RATIO_DEFAULT, gt=0, description="LoRA+: every lora_B trains at this times the "
                            "learning rate (the paper's).")
    lr_b_max: float | None = Field(LR_B_MAX_DEFAULT, gt=0, description="Cap on lora_B's learning rate (never below "
                                   "the learning rate), or none; docs/method.md §8.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the data (unless --max-steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps in all; overrides --num-train-epochs when > 0.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="Examples per device per eval step; "
                                                   "default: the train batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    weight_decay: float = Field(WEIGHT_DECAY_DEFAULT, ge=0, description="AdamW weight decay (the paper's).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up the lr.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0: none.")
    optim: str = Field("adamw_torch", description="transformers optimizer name (an AdamW keeps the LoRA+ groups).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    seed: int | None = Field(None, description="Seed of data order and dropout; default: the plan's.")

    # -- precision and memory
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")

    # -- logging, evaluation, checkpoints
    logging_steps: float = Field(10, gt=0, description="Log every N steps (below 1: that share of the run).")
    eval_steps: float | None = Field(None, gt=0, description="Evaluate every N steps; default: 10 times per run.")
    eval_on_start: bool = Field(True, description="Evaluate before the first step (the plan's starting point).")
    save_steps: float = Field(0.25, gt=0, description="Checkpoint every N steps (below 1: that share of the run).")
    save_total_limit: int | None = Field(3, ge=1, description="Keep at most this many checkpoints.")
    report_to: str | list[str] = Field("auto", description="auto (TensorBoard when installed), none, or a (comma) "
                                       "list of integrations.")
    disable_tqdm: bool = Field(False, description="Hide the progress bar.")
    dataloader_num_workers: int = Field(0, ge=0, description="Processes loading batches; 0: the main one.")

    # -- several processes
    fsdp: str | None = Field(None, description='FSDP2 (under torchrun): --fsdp alone shards fully; or options '
                             f'"full_shard offload" ({", ".join(FSDP_OPTIONS)}).')
    fsdp_config: dict[str, Any] | str | None = Field(None, description="FSDP config JSON file (or dict).")
    deepspeed: str | None = Field(None, description="DeepSpeed config JSON, or zero2 / zero3 for the configs shipped "
                                  "with gorafit.")

    # -- every other TrainingArguments field, as given
    training_arguments: dict[str, Any] = Field(
        default_factory=dict,
        description="Other TrainingArguments fields (eval_strategy, load_best_model_at_end, run_name, ...), passed "
        "to transformers as given; they win over what gorafit derives from its own settings.",
    )

    @model_validator(mode="before")
    @classmethod
    def _training_arguments_aside(cls, values: Any) -> Any:
        """Short names to full ones (``lr``), and TrainingArguments fields that are not gorafit settings into
        ``training_arguments``."""
        if not isinstance(values, dict):
            return values
        own, passed, unknown = sort_keys({SETTING_ALIASES.get(k, k): v for k, v in values.items()})
        if unknown:
            raise ValueError(unknown_keys_message(unknown))
        if passed:
            own["training_arguments"] = {**own.get("training_arguments", {}), **passed}
        return own

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        problems = []
        if self.bf16 and self.fp16:
            problems.append("bf16 and fp16 are both on; choose one")
        if self.fsdp is not None and self.deepspeed is not None:
            problems.append("fsdp and deepspeed are both set; choose one")
        if self.fsdp_config is not None and self.fsdp is None:
            problems.append("fsdp_config is set but fsdp is not; add --fsdp")
        if self.resume and self.overwrite_output_dir:
            problems.append("resume and overwrite_output_dir are both on; resume keeps the run, overwrite replaces it")
        if self.fsdp is not None:
            unknown = [o for o in self.fsdp.replace(",", " ").split() if o not in FSDP_OPTIONS]
            if unknown:
                problems.append(f"unknown fsdp option {unknown[0]!r}; use {', '.join(FSDP_OPTIONS)}")
        if "output_dir" in self.training_arguments:
            problems.append("set the run folder with output_dir, not inside training_arguments")
        problems += [f"{key} is {value!r}, not a finite number" for key, value in _non_finite(self.training_arguments)]
        if self.dataloader_num_workers > MAX_DATALOADER_WORKERS:
            problems.append(f"dataloader_num_workers {self.dataloader_num_workers} is more than "
                            f"{MAX_DATALOADER_WORKERS} (4 per CPU core of this machine)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


MAX_DATALOADER_WORKERS = 4 * (os.cpu_count() or 1)  # beyond this, starting the workers is what takes the time


def _non_finite(values: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(key path, value) of every NaN or infinite float in nested settings (passed-through TrainingArguments)."""
    if isinstance(values, float):
        return [] if math.isfinite(values) else [(prefix, values)]
    if isinstance(values, dict):
        return [found for k, v in values.items() for found in _non_finite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(values, list | tuple):
        return [found for i, v in enumerate(values) for found in _non_finite(v, f"{prefix}[{i}]")]
    return []


@functools.cache
def training_arguments_fields() -> frozenset[str]:
    """Every field of transformers' `TrainingArguments` (imported only when a key needs it)."""
    import dataclasses

    from transformers import TrainingArguments

    return frozenset(f.name for f in dataclasses.fields(TrainingArguments) if f.init)


def sort_keys(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split settings into gorafit's own, other ``TrainingArguments`` fields, and unknown keys."""
    own, passed, unknown = {}, {}, []
    for key, value in values.items():
        if key in TrainSettings.model_fields:
            own[key] = value
        elif key in training_arguments_fields():
            passed[key] = value
        else:
            unknown.append(key)
    return own, passed, unknown


def unknown_keys_message(keys: list[str]) -> str:
    """``unknown setting 'learning_rat' (did you mean 'learning_rate'?)``, for each key."""
    known = sorted(set(TrainSettings.model_fields) | set(SETTING_ALIASES) | training_arguments_fields())
    hints = []
    for key in keys:
        close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
        hints.append(f"{str(key)!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"unknown setting {', '.join(hints)}: neither a gorafit setting nor a TrainingArguments field "
            "(see gorafit run --help)")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or JSON file, keys normalised (``learning-rate`` and ``lr`` mean
    ``learning_rate``); an unknown key is an error that names it.

    >>> load_config_file("train.yaml")  # doctest: +SKIP
    {'learning_rate': 0.0002, 'max_steps': 100}
    """
    path = Path(path)
    if not path.is_file():
        raise GoraError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise GoraError(f"config file {path} is not valid YAML ({first_line(exc)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GoraError(f"config file {path} must hold a mapping of setting: value, not a {type(raw).__name__}")
    return normalise_keys(raw, where=f"config file {path}")


def normalise_keys(values: dict[str, Any], *, where: str = "settings") -> dict[str, Any]:
    """Dashes to underscores, short aliases to full names; unknown keys raise one error naming each."""
    out, given_as = {}, {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        name = SETTING_ALIASES.get(name, name)
        out[name], given_as[name] = value, str(key)
    _, _, unknown = sort_keys(out)
    if unknown:
        message = unknown_keys_message([given_as[name] for name in unknown])
        raise GoraError(message.replace(": neither", f" in {where}: neither", 1))
    return out


def make_train_settings(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainSettings:
    """Settings from a config file's values with command-line ``overrides`` on top (``None`` = not given).

    Every invalid value is reported at once, in one sentence.

    >>> make_train_settings({"learning_rate": 1e-4}, learning_rate=3e-4).learning_rate
    0.0003
    """
    values = dict(file_values or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainSettings(**values)
    except ValidationError as exc:
        raise GoraError("invalid training settings: " + validation_summary(exc)) from None


def learning_rate_warning(settings: TrainSettings) -> str | None:
    """A warning when the learning rates lie beyond what GoRA was measured to train stably at.

    >>> learning_rate_warning(TrainSettings()) is None   # lr 3.16e-4, ratio 16: B at 5.1e-3, capped at 3e-3
    True
    >>> learning_rate_warning(TrainSettings(learning_rate=1e-3, lr_b_max=None)).split(";")[0]
    'warning: every lora_B trains at 0.016 (lr 0.001 x lr-ratio 16)'
    """
    if settings.learning_rate == "auto":  # chosen from the data later; the range test sees any instability
        return None
    ratio = effective_lr_ratio(settings.learning_rate, settings.lr_ratio, settings.lr_b_max)
    b_lr = settings.learning_rate * ratio
    if b_lr <= MEASURED_STABLE_B_LR and settings.learning_rate <= MEASURED_STABLE_LR:
        return None
    return (
        f"warning: every lora_B trains at {b_lr:g} (lr {settings.learning_rate:g} x lr-ratio {ratio:g}); "
        f"in goraplan's quality benchmark GoRA collapsed to one answer in many runs above lora_B lr "
        f"{MEASURED_STABLE_B_LR:g} or lr {MEASURED_STABLE_LR:g} (benchmarks/results/quality/REPORT.md): watch the "
        "eval loss, or lower --lr (or --lr-ratio, --lr-b-max)"
    )


def settings_json(settings: TrainSettings) -> dict[str, Any]:
    """The settings as plain JSON values (for ``run.json``)."""
    return settings.model_dump(mode="json")
