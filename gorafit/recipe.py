"""GoRA stage 2, the recipe: ordinary LoRA training of a planned adapter with the Hugging Face `Trainer`.

`train` reads top to bottom: settings -> run folder -> processes -> model with the plan applied -> data ->
Trainer -> train -> save and check the adapter -> ``run.json``. The optimizer is LoRA+ with a cap on B's
learning rate (docs/method.md §6, `gorafit.optim`); everything else is the Trainer's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainingArguments

from gorafit import run_folder
from gorafit.adapter_check import check_saved_adapter
from gorafit.apply import apply_plan, head_name
from gorafit.run_record import failed, finished, new_record, training_metrics
from gorafit.settings import TrainSettings
from gorafit.trainer import GoraTrainer, JsonLinesLogCallback, StopOnNonFiniteLoss, classification_accuracy
from gorafit.training_args import check_launcher, check_processes, parallelism, training_arguments
from goraplan import distributed
from goraplan.build import peak_memory_mb
from goraplan.errors import GoraError
from goraplan.files import check_can_write, honour_umask
from goraplan.plan import Plan, load_plan

__all__ = ["RunResult", "resolve_settings", "train"]


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

    ``plan`` is a `Plan` or the path of a ``.gora`` file (``plan_path`` names the file of a `Plan` given in
    Python, for the record). ``model`` / ``tokenizer`` replace loading the base model named in the plan (or
    ``settings.model``); ``callbacks`` are Trainer callbacks (``EarlyStoppingCallback``, ...). Works unchanged
    under ``torchrun`` (DDP), with ``settings.fsdp`` and with ``settings.deepspeed``.

    >>> result = train("plan.gora", TrainSettings(data="sarcasm", max_steps=100))  # doctest: +SKIP
    >>> result.metrics["eval_loss"], result.adapter_dir                          # doctest: +SKIP
    """
    started = time.perf_counter()
    plan, plan_path = _read_plan(plan, plan_path)
    settings = resolve_settings(settings or TrainSettings(), plan, plan_path)
    task = plan.manifest.task
    if (model is None) != (tokenizer is None):
        raise GoraError("pass both model and tokenizer to gorafit.train, or neither")

    # ---- run folder and processes (TrainingArguments joins the process group under torchrun)
    out = Path(settings.output_dir)
    resume_from = check_output_dir(out, settings, plan, plan_path)
    has_eval = settings.eval_data is not None or settings.eval_fraction > 0
    args = training_arguments(settings, task, has_eval=has_eval, resuming=resume_from is not None)
    _ = args.device  # reading the device makes accelerate set the process group up
    check_processes(args, settings)
    main = args.process_index == 0

    # ---- model with the plan applied, and data (the main process first: it converts and caches once)
    labels = _label_names(plan, settings)
    if model is None:
        model, tokenizer = _load_base_model(settings, task, labels, plan.manifest.settings.seed)
    peft_model = apply_plan(model, plan, check_fingerprint=not settings.ignore_fingerprint)
    train_ds, eval_ds, data_info = distributed.main_first(lambda: prepare_data(settings, tokenizer, task, labels))

    # ---- only now, with every input checked, is a previous run replaced (--overwrite)
    created = _prepare_output_dir(out, settings, resume_from) if main else False
    distributed.barrier()
    with _stops_recorded(out, main, fresh=resume_from is None, created=created):
        # ---- Trainer (and, with --lr auto, its learning rate), then the record of a running run
        trainer = _make_trainer(peft_model, args, settings, tokenizer, task, train_ds, eval_ds,
                                [JsonLinesLogCallback(run_folder.log_file(out)), StopOnNonFiniteLoss(), *callbacks])
        check_launcher(trainer, settings)
        settings, lr_search = _learning_rate(trainer, settings, train_ds, out)
        record = new_record(plan, plan_path, settings, args, data_info, labels, peft_model, resume_from)
        record["files"] = run_folder.files_of_run(out, args, with_lr_search=lr_search is not None)
        if lr_search is not None:
            record["learning_rate_search"] = lr_search
        if main:
            run_folder.write_record(out, record)

        # ---- train
        train_started = time.perf_counter()
        output = _fit(trainer, resume_from, record, out, main)
        train_seconds = time.perf_counter() - train_started
        final_eval = _final_evaluation(trainer, eval_ds)

        # ---- save the adapter (every process takes part: FSDP and ZeRO-3 gather it), check it, record the run
        adapter_dir = run_folder.adapter_dir(out)
        trainer.save_model(str(adapter_dir))
        distributed.barrier()
        metrics = training_metrics(trainer.state.log_history, output.training_loss, final_eval, trainer.state.global_step)
        error = None
        if main:
            error = _check_adapter(adapter_dir, plan, model if task == "seq-cls" else None)
            record = finished(record, error, metrics=metrics, wall_time_s=time.perf_counter() - started,
                              train_time_s=train_seconds, peak_memory_mb=peak_memory_mb(args.device),
                              global_step=trainer.state.global_step, parallelism=parallelism(trainer))
            run_folder.write_record(out, record)
        distributed.barrier()
        if error is not None:
            raise error
        return RunResult(output_dir=out, adapter_dir=adapter_dir, metrics=metrics, record=record, is_main_process=main)


# ---------------------------------------------------------------------------------------------------- settings
def _read_plan(plan: Plan | str | os.PathLike, plan_path: str | os.PathLike | None) -> tuple[Plan, Path | None]:
    if isinstance(plan, Plan):
        return plan, Path(plan_path) if plan_path is not None else None
    return load_plan(plan), Path(plan)


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
    from goraplan.models import plan_base_model

    # The plan's own model at the commit it was planned on, unless --model/--revision say otherwise.
    model, revision = plan_base_model(manifest.base_model.name_or_path, manifest.base_model.revision,
                                      settings.model, settings.revision)
    return settings.model_copy(update={
        "model": model,
        "revision": revision,
        "data": data,
        "data_split": data_split,
        "eval_split": eval_split,
        "max_length": settings.max_length or manifest.settings.max_length,
        "columns": _column_mapping(settings.columns),
        "seed": settings.seed if settings.seed is not None else manifest.settings.seed,
        "output_dir": settings.output_dir or str(Path("runs") / stem),
        "per_device_eval_batch_size": settings.per_device_eval_batch_size or settings.per_device_train_batch_size,
        "eval_steps": settings.eval_steps if settings.eval_steps is not None else 0.1,
    })


def _column_mapping(columns: dict[str, str] | str | None) -> dict[str, str] | None:
    """``--columns`` checked and as a mapping before any work (run.json records the mapping)."""
    from goraplan.data import parse_columns

    return parse_columns(columns) or None


# ---------------------------------------------------------------------------------------------------- run folder
def check_output_dir(out: Path, settings: TrainSettings, plan: Plan, plan_path: Path | None = None) -> Path | None:
    """Refuse to mix two runs in one folder, or to write over an input; with ``resume``, the newest whole
    checkpoint to continue from."""
    run_folder.check_not_over_inputs(out, [plan_path, *_local_paths(settings.model, settings.data,
                                                                     settings.eval_data)])
    if settings.resume:
        checkpoint = run_folder.last_complete_checkpoint(out)
        if checkpoint is None:
            raise GoraError(
                f"there is no complete checkpoint in {out} to resume from; run without --resume to start afresh"
            )
        record = run_folder.read_record(out)
        recorded = run_folder.plan_sha256(record) if record else None
        if recorded and plan.sha256 and recorded != plan.sha256:
            raise GoraError(
                f"the run in {out} was trained from another plan (sha256 {recorded[:12]}...); resume it with "
                "that plan, or choose another --output-dir"
            )
        return run_folder.resumable_checkpoint(out)
    if run_folder.looks_like_run(out) and not settings.overwrite_output_dir:
        raise GoraError(
            f"output folder {out} holds another run; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output-dir"
        )
    if out.exists() and not out.is_dir():
        raise GoraError(f"output path {out} is a file; give a folder with --output-dir")
    if settings.overwrite_output_dir:
        run_folder.written_by_gorafit(out)  # refuses a folder whose run files no run record claims
    check_can_write(out, overwrite=True, kind="folder", make_parents=True)
    return None


def _local_paths(*names: str | None) -> list[Path]:
    """The settings that name files or folders here (not Hub ids or aliases): inputs the run must not touch."""
    return [Path(name).expanduser() for name in names if name and Path(name).expanduser().exists()]


def _prepare_output_dir(out: Path, settings: TrainSettings, resume_from: Path | None) -> bool:
    """Replace a previous run (--overwrite: only what its record says gorafit wrote); True if `out` is new."""
    created = not out.exists()
    if settings.overwrite_output_dir:
        run_folder.clear_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GoraError(f"cannot create the run folder {out} ({exc.strerror or exc}): choose another --output-dir") \
            from None
    if resume_from is not None:
        run_folder.drop_after(out, resume_from)
    return created


@contextlib.contextmanager
def _stops_recorded(out: Path, main: bool, *, fresh: bool, created: bool) -> Iterator[None]:
    """A run that stops (an error, Ctrl-C, SIGTERM) says so in its record ("failed" / "interrupted"); one that
    stops before writing a record leaves nothing of its own behind (a new folder goes altogether)."""
    try:
        yield
    except BaseException as exc:
        if main:
            _record_stop(out, exc, fresh=fresh, created=created)
        raise


def _record_stop(out: Path, exc: BaseException, *, fresh: bool, created: bool) -> None:
    try:
        record = run_folder.read_record(out)
    except GoraError:
        return
    if record is not None and record.get("status") == "running":
        run_folder.write_record(out, failed(record, exc))
    elif record is None and fresh:
        run_folder.clear_unrecorded(out, remove_folder=created)


# ---------------------------------------------------------------------------------------------------- model, data
def _label_names(plan: Plan, settings: TrainSettings) -> list[str] | None:
    """seq-cls: the plan's class names, or (a plan built in Python without them) the data's."""
    if plan.manifest.task != "seq-cls":
        return None
    if plan.manifest.labels:
        return plan.manifest.labels
    from goraplan.data import label_names_of, load_records

    return label_names_of(load_records(settings.data, settings.data_split))


def _load_base_model(settings: TrainSettings, task: str, labels: list[str] | None, plan_seed: int):
    from goraplan.models import load_model, resolve_model_path

    # A built-in model is converted into the cache once, by the main process; then every process loads it
    # at the same time (under ZeRO-3 loading partitions the weights, which takes all processes together).
    distributed.main_first(lambda: resolve_model_path(settings.model, settings.revision))
    # The seed of a newly initialised classification head is the plan's: the head the gradients were taken with.
    return load_model(settings.model, task, dtype=settings.dtype, label_names=labels,
                      trust_remote_code=settings.trust_remote_code, device="cpu", seed=plan_seed,
                      revision=settings.revision)


def prepare_data(settings: TrainSettings, tokenizer, task: str, labels: list[str] | None):
    """Tokenized train and eval sets (eval held out of the train data unless ``eval_data`` is given)."""
    from goraplan.data import prepare, split_train_eval

    common = dict(max_length=settings.max_length, seed=settings.seed, label_names=labels, columns=settings.columns,
                  packing=settings.packing)
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
        "columns": info.columns,
        "packed": info.packed,
    }
    return train_ds, eval_ds, data_info


# ---------------------------------------------------------------------------------------------------- training
def _make_trainer(peft_model, args: TrainingArguments, settings: TrainSettings, tokenizer, task: str,
                  train_ds, eval_ds, callbacks: list[TrainerCallback]) -> GoraTrainer:
    from goraplan.data import collator_for

    return GoraTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collator_for(tokenizer, task, packed=settings.packing),
        compute_metrics=classification_accuracy if task == "seq-cls" else None,
        callbacks=callbacks,
        lr_ratio=settings.lr_ratio,
        lr_b_max=settings.lr_b_max,
    )


def _learning_rate(trainer: GoraTrainer, settings: TrainSettings, train_ds, out: Path):
    """The settings with the learning rate to train at, and the range test's evidence (None unless --lr auto)."""
    if settings.learning_rate != "auto":
        return settings, None
    return _auto_learning_rate(trainer, settings, train_ds, out)


def _auto_learning_rate(trainer: GoraTrainer, settings: TrainSettings, train_ds, out: Path):
    """``--lr auto``: `gorafit.lr_finder`'s range test on training batches with the run's own optimizer, run
    once (process 0) before training; the choice goes into the Trainer and the settings, the evidence into
    the run folder (``lr_search.json``, ``lr_search.png``; ``gorafit inspect`` shows it)."""
    import math

    from gorafit.lr_finder import LEARNING_SEEN, TOO_FEW_STEPS, search_training_data
    from gorafit.optim import create_optimizer

    if settings.deepspeed is not None or settings.fsdp is not None:
        raise GoraError("--lr auto runs its range test on one process holding the whole model, which DeepSpeed and "
                        "FSDP do not; give --lr a number (e.g. the one a single-device --lr auto run chose)")
    args, model = trainer.args, trainer.model
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = args.max_steps if args.max_steps > 0 else math.ceil(len(train_ds) / batch * args.num_train_epochs)

    # the Trainer's optimizer class, as GoraTrainer.create_optimizer takes it (building TrainingArguments
    # anew to look it up would reset the Trainer's accelerator state)
    optim = trainer.optimizer_cls_and_kwargs or trainer.get_optimizer_cls_and_kwargs(args, model)

    def search():
        model.to(args.device)
        found = search_training_data(
            model, train_ds, trainer.data_collator,
            lambda lr: create_optimizer(model, lr, settings.lr_ratio, settings.lr_b_max, settings.weight_decay,
                                        optim=optim),
            batch_size=batch, train_steps=steps, seed=args.seed, max_grad_norm=args.max_grad_norm)
        run_folder.save_lr_search(out, found)
        return found

    found = distributed.from_main(search)
    args.learning_rate = found.chosen
    summary = {"chosen": found.chosen, "candidates": len(found.candidates), "seconds": found.seconds,
               "learning_seen": found.rule == LEARNING_SEEN, "too_few_steps": found.rule == TOO_FEW_STEPS,
               "edge": found.extra.get("edge"),
               "file": run_folder.LR_SEARCH_FILE}
    return settings.model_copy(update={"learning_rate": found.chosen}), summary


def _fit(trainer: GoraTrainer, resume_from: Path | None, record: dict, out: Path, main: bool):
    """``trainer.train``; if it stops, the record says the run did not finish and why (--resume continues it).
    A loss that is not a number ends the run too: the adapter would be no use."""
    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except BaseException as exc:
        if main:
            run_folder.write_record(out, failed(record, exc))
        raise
    if not math.isfinite(output.training_loss):
        raise GoraError(f"the training loss became {output.training_loss} (not a number) and the adapter is no use: "
                        "lower --lr (or --lr-ratio, --lr-b-max), or train in float32")
    return output


def _final_evaluation(trainer: GoraTrainer, eval_ds) -> dict[str, Any]:
    """The eval metrics at the last step: the logged ones when the last eval fell on it, else a new eval."""
    if eval_ds is None:
        return {}
    last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
        return {k: v for k, v in last_eval.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _check_adapter(adapter_dir: Path, plan: Plan, seq_cls_model: nn.Module | None) -> GoraError | None:
    """Check the saved adapter on disk (main process); the error is raised after the others are released."""
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; run.json has every setting
    honour_umask(adapter_dir)  # safetensors writes the weights 0600: a serving account could not read them
    try:
        check_saved_adapter(adapter_dir, plan, head=head_name(seq_cls_model) if seq_cls_model is not None else None)
    except GoraError as exc:
        return exc
    return None
