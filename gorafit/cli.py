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

import signal

import click

from gorafit.cli_export import export_cmd, verify_cmd
from gorafit.settings import TrainSettings
from goraplan.cli_options import NumberOrWord, given_values, settings_options
from goraplan.cli_support import run_cli

__all__ = ["cli", "main"]


@click.group(help=__doc__)
@click.version_option(package_name="goraplan", prog_name="gorafit")
def cli() -> None:
    pass


_NO_CAP = "none"  # --lr-b-max none: no cap on lora_B's learning rate

_RUN_OPTIONS = settings_options(
    TrainSettings,
    exclude=("training_arguments",),
    decls={
        "ignore_fingerprint": ("--ignore-fingerprint/--check-fingerprint",),
        "output_dir": ("--output-dir", "-o"),
        "overwrite_output_dir": ("--overwrite", "--overwrite-output-dir"),
        "resume": ("--resume",),
        "learning_rate": ("--learning-rate", "--lr"),
        "num_train_epochs": ("--num-train-epochs", "--epochs"),
        "per_device_train_batch_size": ("--per-device-train-batch-size", "--batch-size"),
        "per_device_eval_batch_size": ("--per-device-eval-batch-size", "--eval-batch-size"),
        "gradient_accumulation_steps": ("--gradient-accumulation-steps", "--grad-accum"),
        "disable_tqdm": ("--disable-tqdm/--enable-tqdm",),
    },
    extra={
        "lr_b_max": {"type": NumberOrWord((_NO_CAP,))},
        "report_to": {"type": click.STRING},
        "fsdp": {"is_flag": False, "flag_value": "full_shard"},
        "fsdp_config": {"type": click.Path(dir_okay=False)},
    },
)


@cli.command("run")
@click.argument("plan_path", metavar="PLAN", type=click.Path(dir_okay=False))
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML or JSON file of settings: the option names (with _ or -) and any other TrainingArguments "
              "field; options given here win.")
@_RUN_OPTIONS
def run_cmd(plan_path: str, config_file: str | None, **given) -> None:
    """Train the adapter PLAN describes (HF Trainer, LoRA+ learning rates) into a run folder."""
    from gorafit.recipe import train
    from gorafit.settings import learning_rate_warning, load_config_file, make_train_settings
    from gorafit.training_args import launch_warning
    from goraplan import distributed

    file_values = load_config_file(config_file) if config_file else {}
    given = given_values(given)
    if given.get("lr_b_max") == _NO_CAP:  # "none" given: no cap (None itself means "not given")
        file_values = {**file_values, "lr_b_max": None}
        del given["lr_b_max"]
    settings = make_train_settings(file_values, **given)
    for warning in (learning_rate_warning(settings), launch_warning()):
        if warning and distributed.is_main():
            click.echo(warning, err=True)
    result = train(plan_path, settings)
    distributed.finish()
    if result.is_main_process:
        click.echo(f"trained: {', '.join(_summary(result.metrics))}")
        search = result.record.get("learning_rate_search")
        if search:
            click.echo(f"lr auto: {search['chosen']:.3g} from {search['candidates']} candidates in "
                       f"{search['seconds']:.1f} s (gorafit inspect {result.output_dir})")
            if search.get("too_few_steps"):
                click.echo(too_few_steps_warning(search["chosen"]), err=True)
            elif search.get("learning_seen") is False:
                click.echo(auto_fallback_warning(search["chosen"], search.get("edge")), err=True)
        click.echo(f"adapter: {result.adapter_dir}")


def auto_fallback_warning(chosen: float, edge: float | None) -> str:
    """What --lr auto says when its probe saw no learning and it kept the default lr.

    >>> auto_fallback_warning(1e-4, 0.00178).split(";")[0]
    'Warning: --lr auto saw no learning within its budget (no candidate lowered the held-out training loss enough), so it trained at the default lr 0.0001'
    """
    where = f"; harm began above {edge:.3g}" if edge else ""
    return (f"Warning: --lr auto saw no learning within its budget (no candidate lowered the held-out training loss "
            f"enough), so it trained at the default lr {chosen:.3g}{where}. Expected with a new classification head "
            f"or a short run: give --lr a number (or try a few) if the result disappoints.")


def too_few_steps_warning(chosen: float) -> str:
    """What --lr auto says when the run was too short for its range test to be trusted.

    >>> too_few_steps_warning(3.16e-4).split(": the run")[0]
    'Warning: --lr auto trained at the default lr 0.000316'
    """
    return (f"Warning: --lr auto trained at the default lr {chosen:.3g}: the run is too short for its range test "
            f"(one probe step per candidate within 10 % of the run, which cannot tell a good lr from one that "
            f"collapses). Give --lr a number, or keep --lr auto for runs of about 100 steps or more.")


def _summary(m: dict) -> list[str]:
    """The metrics in a few words; a value that is not a number (a damaged run.json) is left out."""
    def number(key: str) -> float | None:
        value = m.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    parts = [f"{number('global_step')} steps"]
    if number("train_loss") is not None:
        parts.append(f"train loss {number('train_loss'):.4f}")
    if number("eval_loss") is not None:
        start = number("eval_loss_start")
        parts.append(f"eval loss {number('eval_loss'):.4f}" + (f" (from {start:.4f})" if start is not None else ""))
    if number("eval_accuracy") is not None:
        parts.append(f"eval accuracy {number('eval_accuracy'):.2%}")
    return parts


@cli.command("inspect")
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the run record and the lr search as JSON.")
def inspect_cmd(run_dir: str, as_json: bool) -> None:
    """Show a run folder: status, learning rates, metrics, and how --lr auto chose its lr."""
    import json
    from pathlib import Path

    from gorafit import run_folder
    from gorafit.lr_finder import format_lr_search
    from goraplan.errors import GoraError
    from goraplan.untrusted import printable

    run = Path(run_dir)
    record = run_folder.read_record(run)
    if record is None:
        raise GoraError(f"{run} holds no run ({run_folder.RUN_FILE} is missing): give the folder gorafit run wrote")
    search = run_folder.read_lr_search(run)
    if as_json:
        click.echo(json.dumps({"run": record, "lr_search": search.to_dict() if search else None}, indent=1))
        return
    # run.json is read from a folder anyone may have written: every value is shown inert, whatever its type
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    plan = record.get("plan") if isinstance(record.get("plan"), dict) else {}
    click.echo(printable(f"run {run}: {record.get('status')}, plan {plan.get('path')}"))
    click.echo(printable(f"lr {settings.get('learning_rate')} (lora_B {record.get('lora_B_learning_rate')}), "
                         f"{record.get('global_step', '?')} steps"))
    if isinstance(record.get("metrics"), dict) and record["metrics"]:
        click.echo(printable(f"metrics: {', '.join(_summary(record['metrics']))}"))
    if search is None:
        click.echo("lr: given (no --lr auto search)")
    else:
        click.echo(format_lr_search(search))
        click.echo(f"picture: {run / run_folder.LR_SEARCH_PLOT}")


cli.add_command(export_cmd, "export")
cli.add_command(verify_cmd, "verify")


def main() -> None:
    """Console-script entry point: errors become one sentence and exit code 2; SIGTERM (a scheduler's stop, a
    torchrun peer failing) ends the run like Ctrl-C, so its record says "interrupted" and no staging is left."""
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    run_cli(cli)


def _terminate_cleanly(signum, frame):
    raise KeyboardInterrupt
