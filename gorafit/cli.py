"""`gorafit`: train the adapter a GoRA plan describes, then export it.

Examples:

\b
    gorafit run plan.gora --max-steps 200 --lr 2e-4
    gorafit run plan.gora --data sarcasm --eval-data sarcasm --output-dir runs/sarcasm
    gorafit run plan.gora --config train.yaml --resume
    torchrun --nproc_per_node 2 -m gorafit run plan.gora --batch-size 4
    gorafit export runs/sarcasm --format peft -o exported

Bad input exits with code 2 and one sentence; set GORA_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import os

import click

from goraplan.cli_support import run_cli

__all__ = ["cli", "main"]


@click.group(help=__doc__)
@click.version_option(package_name="goraplan", prog_name="gorafit")
def cli() -> None:
    pass


def _options(*specs):
    def decorate(f):
        for spec in reversed(specs):
            f = spec(f)
        return f

    return decorate


_FLOAT_STEPS = click.FloatRange(min=0, min_open=True)


class _OptionalLearningRate(click.ParamType):
    """A positive number, or ``none``."""

    name = "FLOAT|none"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float) or value == _NO_CAP:
            return value
        if str(value).lower() == "none":
            return _NO_CAP
        try:
            number = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)
        if not number > 0:
            self.fail(f"{value!r} must be above 0 (or 'none')", param, ctx)
        return number


_NO_CAP = "none"
_OPTIONAL_LR = _OptionalLearningRate()

_RUN_OPTIONS = _options(
    # base model
    click.option("--model", help="Base model (Hub id, folder or built-in alias); default: the plan's."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                 help="dtype the base model is loaded in [float32]."),
    click.option("--trust-remote-code/--no-trust-remote-code", default=None, help="Allow model code from the Hub."),
    click.option("--ignore-fingerprint/--check-fingerprint", default=None,
                 help="Train even if the base weights differ from the ones the plan was built on."),
    # data
    click.option("--data", help="Training data (alias, jsonl/json/csv/parquet file, folder, Hub name); "
                                "default: the plan's calibration data."),
    click.option("--data-split", help="Split of --data; default: the plan's split, or train."),
    click.option("--eval-data", help="Evaluation data; default: hold out --eval-fraction of --data."),
    click.option("--eval-split", help="Split of --eval-data; default: test when it has one, else train."),
    click.option("--eval-fraction", type=click.FloatRange(0, 1, max_open=True),
                 help="Share of --data held out for evaluation when there is no --eval-data; 0: none [0.05]."),
    click.option("--max-length", type=click.IntRange(min=2), help="Tokens per example at most; default: the plan's."),
    click.option("--max-train-samples", type=click.IntRange(min=1),
                 help="Use at most this many examples of --data (before the eval share is held out)."),
    click.option("--max-eval-samples", type=click.IntRange(min=1), help="Use at most this many eval examples."),
    # run folder
    click.option("--output-dir", "-o", "output_dir", help="Run folder; default: runs/<plan name>."),
    click.option("--overwrite", "--overwrite-output-dir", "overwrite_output_dir", is_flag=True, default=None,
                 help="Replace a previous run in the output folder."),
    click.option("--resume", is_flag=True, default=None,
                 help="Continue from the last complete checkpoint in the output folder."),
    # optimisation
    click.option("--learning-rate", "--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
                 help="Peak learning rate of lora_A and the head [1e-4]."),
    click.option("--lr-ratio", type=click.FloatRange(min=0, min_open=True),
                 help="LoRA+: every lora_B trains at this times the learning rate [16, the paper's]."),
    click.option("--lr-b-max", type=_OPTIONAL_LR,
                 help="Cap on lora_B's learning rate (not below --lr), or 'none' [3e-3, from the quality benchmark]."),
    click.option("--num-train-epochs", "--epochs", "num_train_epochs", type=click.FloatRange(min=0, min_open=True),
                 help="Epochs over the data [1]."),
    click.option("--max-steps", type=int, help="Optimizer steps in all; overrides --epochs when > 0."),
    click.option("--per-device-train-batch-size", "--batch-size", "per_device_train_batch_size",
                 type=click.IntRange(min=1), help="Examples per device per step [8]."),
    click.option("--per-device-eval-batch-size", "--eval-batch-size", "per_device_eval_batch_size",
                 type=click.IntRange(min=1), help="Examples per device per eval step; default: the train batch size."),
    click.option("--gradient-accumulation-steps", "--grad-accum", "gradient_accumulation_steps",
                 type=click.IntRange(min=1), help="Forward passes per optimizer step [1]."),
    click.option("--weight-decay", type=click.FloatRange(min=0), help="AdamW weight decay [5e-4]."),
    click.option("--warmup-ratio", type=click.FloatRange(0, 1, max_open=True), help="Share of steps warming up [0.03]."),
    click.option("--lr-scheduler-type", help="cosine, linear, constant, ... [cosine]."),
    click.option("--max-grad-norm", type=click.FloatRange(min=0), help="Gradient clipping; 0: none [1.0]."),
    click.option("--optim", help="transformers optimizer name [adamw_torch]."),
    click.option("--seed", type=int, help="Seed of data order and dropout; default: the plan's."),
    # precision and memory
    click.option("--bf16/--no-bf16", default=None, help="bfloat16 mixed precision."),
    click.option("--fp16/--no-fp16", default=None, help="float16 mixed precision (GPU)."),
    click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                 help="Recompute activations to save memory."),
    # logging, evaluation, checkpoints
    click.option("--logging-steps", type=_FLOAT_STEPS, help="Log every N steps (below 1: that share of the run) [10]."),
    click.option("--eval-steps", type=_FLOAT_STEPS, help="Evaluate every N steps; default: 10 times per run."),
    click.option("--eval-on-start/--no-eval-on-start", default=None, help="Evaluate before the first step [on]."),
    click.option("--save-steps", type=_FLOAT_STEPS, help="Checkpoint every N steps (below 1: share of the run) [0.25]."),
    click.option("--save-total-limit", type=click.IntRange(min=1), help="Keep at most this many checkpoints [3]."),
    click.option("--report-to", help="auto (TensorBoard when installed), none, or a comma list [auto]."),
    click.option("--disable-tqdm/--enable-tqdm", default=None, help="Hide the progress bar."),
    # several processes
    click.option("--fsdp", is_flag=False, flag_value="full_shard", default=None,
                 help='FSDP2 (under torchrun): --fsdp alone shards fully; or options "full_shard offload".'),
    click.option("--fsdp-config", type=click.Path(dir_okay=False), help="FSDP config JSON file."),
    click.option("--deepspeed", help="DeepSpeed config JSON, or zero2 / zero3 for the configs shipped with gorafit."),
)


@cli.command("run")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON file of settings (the option names, with _ or -); options given here win.")
@_RUN_OPTIONS
def run_cmd(plan_path: str, config_file: str | None, **given) -> None:
    """Train the adapter PLAN describes (HF Trainer, LoRA+ learning rates) into a run folder."""
    # Imported here so `gorafit --help` stays fast.
    from gorafit.settings import learning_rate_warning, load_config_file, make_train_settings
    from gorafit.train import train

    file_values = load_config_file(config_file) if config_file else {}
    if given.get("lr_b_max") == _NO_CAP:  # "none" given: no cap (None itself means "not given")
        file_values = {**file_values, "lr_b_max": None}
        given["lr_b_max"] = None
    settings = make_train_settings(file_values, **given)
    warning = learning_rate_warning(settings)
    if warning and _is_main_process():
        click.echo(warning, err=True)
    result = train(plan_path, settings)
    _end_process_group()
    if result.is_main_process:
        m = result.metrics
        parts = [f"{m['global_step']} steps"]
        if m.get("train_loss") is not None:
            parts.append(f"train loss {m['train_loss']:.4f}")
        if m.get("eval_loss") is not None:
            start = m.get("eval_loss_start")
            parts.append(f"eval loss {m['eval_loss']:.4f}" + (f" (from {start:.4f})" if start is not None else ""))
        if m.get("eval_accuracy") is not None:
            parts.append(f"eval accuracy {m['eval_accuracy']:.2%}")
        click.echo(f"trained: {', '.join(parts)}")
        click.echo(f"adapter: {result.adapter_dir}")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _end_process_group() -> None:
    """Leave torch.distributed cleanly (every process is past the final barrier), not at interpreter exit."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


try:  # `gorafit export` / `gorafit verify` live in their own module
    from gorafit.cli_export import export_cmd, verify_cmd

    cli.add_command(export_cmd, "export")
    cli.add_command(verify_cmd, "verify")
except ImportError:  # pragma: no cover - only while that module is missing
    pass


def main() -> None:
    """Console-script entry point: errors become one sentence and exit code 2."""
    run_cli(cli)
