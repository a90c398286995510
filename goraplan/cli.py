"""`goraplan`: build, inspect, validate and compare GoRA plans.

\b
Examples:
  goraplan build --model smollm2-135m --data sarcasm-lm -o plan.gora
  goraplan inspect plan.gora --plot ranks.png
  goraplan validate plan.gora --model smollm2-135m
  goraplan diff a.gora b.gora
  goraplan card plan.gora -o card --repo team-a/sarcasm-plan
  goraplan push plan.gora team-a/sarcasm-plan
  goraplan build --ranks-from team-a/sarcasm-plan --data my.jsonl -o mine.gora
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from goraplan import distributed
from goraplan.cli_hub import card_cmd, push_cmd
from goraplan.cli_options import given_values, settings_options
from goraplan.cli_support import run_cli
from goraplan.errors import GoraError
from goraplan.files import check_can_write
from goraplan.hub import resolve_plan_source
from goraplan.plan import load_plan, manifest_json_schema
from goraplan.settings import PlanSettings, make_settings
from goraplan.targets import find_target_modules, parse_target_modules
from goraplan.untrusted import printable

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = {"causal-lm": "sarcasm-lm", "seq-cls": "sarcasm"}


@click.group(help=__doc__)
@click.version_option(package_name="goraplan")
def cli() -> None:
    pass


# ---------------------------------------------------------------------------- build
@cli.command()
@click.option("--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Hub id (OWNER/NAME[@REVISION]), local folder, or built-in alias (smollm2-135m, minilm-l6).")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub --model (the plan records the commit).")
@click.option("--ranks-from", "ranks_from", default=None, metavar="PLAN",
              help="Keep this plan's target modules and ranks (file or OWNER/NAME[@REVISION]); gradients, importance "
              "and the initial adapter come from --data.")
@click.option("--data", default=None, help="Data set: Hub name, local jsonl/json/csv/parquet, or built-in alias "
              "(default: sarcasm-lm for causal-lm, sarcasm for seq-cls).")
@click.option("--split", default="train", show_default=True, help="Data split to calibrate on.")
@click.option("--columns", default=None, metavar="STANDARD=YOURS,...",
              help="Read your data set's columns as the standard ones, e.g. prompt=question,completion=answer.")
@click.option("--packing", is_flag=True, help="Pack several causal-lm examples into each --max-length row "
              "(each still attends only to itself).")
@settings_options(
    PlanSettings,
    decls={"offload_gradients": ("--offload-gradients",), "gradient_checkpointing": ("--gradient-checkpointing",)},
    extra={"target_modules": {"type": click.STRING}},
)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16", "auto"]))
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code from the Hub.")
@click.option("--fsdp", is_flag=True, help="Shard the model over the torchrun processes with FSDP2: each holds "
              "1/N of every weight and gradient (torchrun --nproc_per_node N -m goraplan build --fsdp ...).")
@click.option("-o", "--output", default="plan.gora", show_default=True, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never one of the inputs).")
def build(model_name, revision, ranks_from, data, split, columns, packing, dtype, trust_remote_code, fsdp, output,
          overwrite, **given):
    """Accumulate gradients, allocate ranks and write the initial adapter as a .gora plan."""
    from goraplan.build import build_plan
    from goraplan.progress import progress as progress_reporter

    settings, other = _plan_settings(given_values(given), ranks_from)
    data = data or DEFAULT_DATA[settings.task]
    output = check_can_write(output, overwrite=overwrite, inputs=[
        *_local_paths(model_name, data), resolve_plan_source(ranks_from) if ranks_from else None])
    if fsdp:
        _check_fsdp(settings)
    started = time.perf_counter()
    rank_id = distributed.init_if_launched()

    model_name, commit, model, tokenizer, labels = _load_model(model_name, revision, data, split, columns, settings,
                                                               dtype, trust_remote_code, fsdp)
    fixed_ranks = _reused_ranks(other, model, ranks_from)
    find_target_modules(model, settings.resolved().target_modules)  # fails fast, before any gradient step
    batches = _calibration_batches(data, split, columns, packing, tokenizer, labels, settings)

    bar = progress_reporter(settings.steps, "gradient steps", enabled=rank_id == 0)

    def progress(step: int, loss: float) -> None:
        bar.advance(min(distributed.world(), settings.steps - step), loss=f"{loss:.4f}")  # this round's steps

    plan = build_plan(model, batches, settings, model_name=model_name, data_source=data, data_split=split,
                      labels=labels, progress=progress, fixed_ranks=fixed_ranks, model_revision=commit)
    bar.close()
    if other is not None:
        from goraplan import ranks_from as reuse

        plan = reuse.record_ranks_source(plan, other, ranks_from)
    if rank_id == 0:
        plan.save(output)
        _echo_built(plan, output, settings, time.perf_counter() - started, model)
        if other is not None:
            click.echo(f"ranks and target modules from {printable(ranks_from)} (sha256 {other.sha256[:16]}); "
                       f"importance and initial adapter from {printable(data)}")
    distributed.finish()


def _plan_settings(given: dict, ranks_from: str | None):
    """The validated settings (with the ranks of ``--ranks-from`` adopted) and that plan, before any data or model:
    a plan that cannot be read fails first."""
    if "target_modules" in given:
        given["target_modules"] = parse_target_modules(given["target_modules"])
    settings = make_settings(**given)
    if not ranks_from:
        return settings, None
    from goraplan import ranks_from as reuse

    clash = [f"--{name.replace('_', '-')}" for name in reuse.ALLOCATION_FIELDS if name in given]
    if clash:
        raise GoraError(f"--ranks-from takes {', '.join(clash)} from that plan: drop {' and '.join(clash)}.")
    other = load_plan(ranks_from)
    return reuse.adopt_allocation(settings, other), other


def _check_fsdp(settings: PlanSettings) -> None:
    if not distributed.launched():
        raise GoraError("--fsdp shards the model over the processes torchrun starts: run "
                        "torchrun --nproc_per_node N -m goraplan build --fsdp ...")
    from goraplan.sharded import check_importance_metric

    check_importance_metric(settings.importance)  # before the model and data are loaded


def _load_model(model_name, revision, data, split, columns, settings, dtype, trust_remote_code, fsdp):
    """The base model at its Hub commit (sharded with ``fsdp``); the data is read first, so bad data fails
    before a model is loaded. Returns the model's name and commit, model, tokenizer and seq-cls labels."""
    import datasets

    from goraplan import data as data_mod
    from goraplan.hub import split_model_revision
    from goraplan.models import hub_commit, load_model
    from goraplan.progress import quiet_library_bars
    from goraplan.sharded_load import load_sharded_model

    datasets.disable_progress_bars()
    quiet_library_bars()
    model_name, revision = split_model_revision(model_name, revision)
    commit = hub_commit(model_name, revision)  # None for a local folder or built-in model
    records = data_mod.map_columns(data_mod.load_records(data, split), columns)
    labels = data_mod.label_names_of(records) if settings.task == "seq-cls" else None
    loader = load_sharded_model if fsdp else load_model
    model, tokenizer = loader(model_name, settings.task, dtype=dtype, num_labels=len(labels) if labels else None,
                              label_names=labels, trust_remote_code=trust_remote_code, seed=settings.seed,
                              revision=commit)
    return model_name, commit, model, tokenizer, labels


def _reused_ranks(other, model, ranks_from):
    if other is None:
        return None
    from goraplan import ranks_from as reuse

    return reuse.reusable_ranks(other, model, ranks_from)


def _calibration_batches(data, split, columns, packing, tokenizer, labels, settings):
    """The N gradient batches (and K held-out ones for step size 'auto') of the calibration data."""
    from goraplan import data as data_mod

    ds, _ = data_mod.prepare(data, tokenizer, settings.task, split=split, max_length=settings.max_length,
                             seed=settings.seed, limit=settings.batches_needed * settings.batch_size,
                             label_names=labels, columns=columns, packing=packing)
    collator = data_mod.collator_for(tokenizer, settings.task, packed=packing)
    return data_mod.make_batches(ds, collator, settings.batch_size, settings.batches_needed, source=data)


def _echo_built(plan, output, settings, seconds: float, model) -> None:
    from goraplan.build import peak_memory_mb

    ranks = [m.rank for m in plan.manifest.modules]
    t = plan.manifest.totals
    st = plan.stats
    click.echo(
        f"wrote {printable(output)}: {len(ranks)} modules, ranks {min(ranks)}..{max(ranks)}, "
        f"{t.allocated:,} params vs plain LoRA r={settings.rank} {t.lora_equivalent:,} (ratio {t.ratio:.4f}), "
        f"{seconds:.1f} s total (gradients {st['gradients_s']:.1f} s, importance "
        f"{st['importance_s']:.2f} s, allocation {st['allocation_s']:.3f} s, init {st['init_s']:.2f} s), "
        f"peak memory {peak_memory_mb(next(model.parameters()).device):.0f} MiB"
    )


def _local_paths(*names: str) -> list[Path]:
    """The arguments that name files or folders here (not Hub ids or built-in aliases): inputs to protect."""
    return [Path(name).expanduser() for name in names if name and Path(name).expanduser().exists()]


# ---------------------------------------------------------------------------- inspect / validate / diff / schema
@cli.command()
@click.argument("plan_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the rank chart to this PNG.")
@click.option("--modules/--no-modules", default=True, show_default=True, help="Show the per-module table.")
def inspect(plan_path, as_json, plot, modules):
    """Summary, rank distribution per module type and per-module table of a plan."""
    from goraplan import report

    if plot:  # a bad chart path fails before the plan is read
        report.check_plot_path(plot, inputs=[plan_path])
    plan = load_plan(plan_path)
    if as_json:
        click.echo(plan.manifest.model_dump_json(indent=2))
    else:
        for line in report.summary_lines(plan) + [""] + report.type_table_lines(plan):
            click.echo(line)
        if modules:
            click.echo("")
            for line in report.module_table_lines(plan):
                click.echo(line)
    if plot:
        report.plot_ranks(plan, plot)
        click.echo(f"wrote {printable(plot)}", err=as_json)


@cli.command()
@click.argument("plan_path", type=click.Path(dir_okay=False))
@click.option("--model", "model_name", default=None, help="Also check this base model's shapes and fingerprint.")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub --model.")
@click.option("--dtype", default="float32", show_default=True)
def validate(plan_path, model_name, revision, dtype):
    """Check a plan's schema, checksums and shapes, and optionally that a model matches it."""
    plan = load_plan(plan_path)
    click.echo(f"{printable(plan_path)}: valid plan (schema v{plan.manifest.schema_version}, "
               f"{len(plan.manifest.modules)} modules, checksums verified)")
    if model_name:
        from goraplan.match import check_model_matches
        from goraplan.models import load_model

        model, _ = load_model(model_name, plan.manifest.task, dtype=dtype,
                              num_labels=len(plan.manifest.labels) if plan.manifest.labels else None,
                              label_names=plan.manifest.labels, revision=revision)
        note = check_model_matches(plan, model)
        click.echo(f"{printable(model_name)}: matches the plan (shapes and weight fingerprint{'; ' + note if note else ''})")


@cli.command()
@click.argument("first", type=click.Path(dir_okay=False))
@click.argument("second", type=click.Path(dir_okay=False))
def diff(first, second):
    """What two plans disagree on: settings, ranks, importance order."""
    from goraplan import report

    for line in report.diff_lines(load_plan(first), load_plan(second)):
        click.echo(line)


@cli.command()
def schema():
    """Print the JSON Schema of the plan manifest."""
    click.echo(json.dumps(manifest_json_schema(), indent=2))


cli.add_command(card_cmd)
cli.add_command(push_cmd)


def _terminate_cleanly(signum, frame):  # SIGTERM runs `finally` blocks (temporary files) like Ctrl-C does
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    run_cli(cli, sys.argv[1:])


if __name__ == "__main__":
    main()
