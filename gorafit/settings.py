"""Every setting of `gorafit run`, validated up front and recorded in the run folder's ``run.json``.

Names follow Hugging Face ``TrainingArguments`` wherever one exists, so a ``train.yaml`` reads like the
arguments people already know. ``None`` means "take it from the plan" (model, data, max length, seed).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from goraplan.errors import GoraError
from goraplan.settings import validation_summary

__all__ = ["SETTING_ALIASES", "TrainSettings", "load_config_file", "make_train_settings"]

# From benchmarks/results/quality (MiniLM-L6 and SmolLM2-135M, one epoch, 3 and 2 seeds). GoRA collapsed
# in every NLU run whose lora_B lr was 1.2e-2 or more (x16 at lr >= 1e-3, x4 at lr 3e-3). Capping B's lr
# at 5e-3 still let 1 of 3 seeds collapse at lr 1e-3; at 3e-3 none did at any lr <= 1e-3 (NLU and NLG),
# at a cost within the seed spread at lr 3e-4 (GoRA's best x16 cell). At lr 3e-3 even plain x1 lost a seed.
LR_B_MAX_DEFAULT = 3e-3  # the cap gorafit applies by default
MEASURED_STABLE_B_LR = 5e-3  # warn above this B lr ...
MEASURED_STABLE_LR = 1e-3  # ... or above this lr

# Short names accepted in a config file as on the command line (--lr, --epochs, ...).
SETTING_ALIASES = {
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "overwrite": "overwrite_output_dir",
}


class TrainSettings(BaseModel):
    """Settings of `gorafit run` (GoRA stage 2). Unknown keys are errors.

    >>> TrainSettings(learning_rate=2e-4).lr_ratio
    16.0
    """

    model_config = ConfigDict(extra="forbid")

    # -- base model
    model: str | None = Field(None, description="Base model (Hub id, folder or alias); default: the plan's.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the base model is loaded in.")
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub.")
    ignore_fingerprint: bool = Field(False, description="Train even if the base weights differ from the plan's.")

    # -- data
    data: str | None = Field(None, description="Training data (alias, file, folder, Hub name); default: the plan's.")
    data_split: str | None = Field(None, description="Split of --data; default: the plan's calibration split or train.")
    eval_data: str | None = Field(None, description="Evaluation data; default: hold out --eval-fraction of --data.")
    eval_split: str | None = Field(None, description="Split of --eval-data; default: test if it has one, else train.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of --data held out when no --eval-data (0: none).")
    max_length: int | None = Field(None, ge=2, description="Tokens per example at most; default: the plan's.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many evaluation examples.")

    # -- run folder
    output_dir: str | None = Field(None, description="Run folder; default: runs/<plan name>.")
    overwrite_output_dir: bool = Field(False, description="Replace a previous run in the output folder.")
    resume: bool = Field(False, description="Continue from the last complete checkpoint in the output folder.")

    # -- optimisation (paper: AdamW, cosine, 3% warmup, B at 16 x the lr of A)
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of every lora_A and the head.")
    lr_ratio: float = Field(16.0, gt=0, description="LoRA+ ratio: every lora_B trains at lr_ratio x learning_rate.")
    lr_b_max: float | None = Field(
        LR_B_MAX_DEFAULT,
        gt=0,
        description="Cap on lora_B's learning rate: B trains at min(lr_ratio x lr, lr_b_max) but not below lr; "
        "None: no cap. The default 3e-3 comes from benchmarks/results/quality (see LR_B_MAX_DEFAULT).",
    )
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training data (unless max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps in all; overrides num_train_epochs when > 0.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per forward pass.")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="Default: the train batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay (the paper's 5e-4).")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up the lr.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name: cosine, linear, constant, ...")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping (0: none).")
    optim: str = Field("adamw_torch", description="transformers optimizer name (an AdamW by default).")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    seed: int | None = Field(None, description="Seed of data order and dropout; default: the plan's seed.")

    # -- precision and memory
    bf16: bool = Field(False, description="bfloat16 mixed precision.")
    fp16: bool = Field(False, description="float16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")

    # -- logging, evaluation, checkpoints
    logging_steps: float = Field(10, gt=0, description="Log every N steps (a float < 1: that share of the run).")
    eval_steps: float | None = Field(None, gt=0, description="Evaluate every N steps; default: 10 times per run.")
    eval_on_start: bool = Field(True, description="Evaluate once before the first step (the plan's starting point).")
    save_steps: float = Field(0.25, gt=0, description="Checkpoint every N steps (a float < 1: that share of the run).")
    save_total_limit: int | None = Field(3, ge=1, description="Keep at most this many checkpoints.")
    report_to: str = Field("auto", description="auto (TensorBoard when installed), none, or a comma list.")
    disable_tqdm: bool = Field(False, description="Hide the progress bar.")
    dataloader_num_workers: int = Field(0, ge=0)

    # -- several processes
    fsdp: str | None = Field(None, description="FSDP2 options: full_shard (default), shard_grad_op, offload.")
    fsdp_config: dict[str, Any] | str | None = Field(None, description="FSDP config dict or JSON file.")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON file, or zero2 / zero3 for the shipped configs.")

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
        if problems:
            raise ValueError("; ".join(problems))
        return self


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


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
        raise GoraError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GoraError(f"config file {path} must hold a mapping of setting: value, not a {type(raw).__name__}")
    return normalise_keys(raw, where=f"config file {path}")


def normalise_keys(values: dict[str, Any], *, where: str = "settings") -> dict[str, Any]:
    """Dashes to underscores, short aliases to full names; unknown keys raise one error naming each."""
    known = set(TrainSettings.model_fields)
    out: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        name = SETTING_ALIASES.get(name, name)
        if name not in known:
            unknown.append(str(key))
            continue
        out[name] = value
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), sorted(known | set(SETTING_ALIASES)), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise GoraError(f"unknown setting {', '.join(hints)} in {where}; see gorafit run --help for the settings")
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


def learning_rate_warning(settings: TrainSettings) -> str | None:
    """A warning when the learning rates lie beyond what GoRA was measured to train stably at.

    >>> learning_rate_warning(TrainSettings()) is None   # lr 1e-4, ratio 16: B at 1.6e-3
    True
    >>> learning_rate_warning(TrainSettings(learning_rate=1e-3, lr_b_max=None)).split(";")[0]
    'warning: every lora_B trains at 0.016 (lr 0.001 x lr-ratio 16)'
    """
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
    return json.loads(settings.model_dump_json())
