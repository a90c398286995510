"""A `gorafit run` folder: its layout, its record and its checkpoints. The one module that knows them.

::

    RUN/
      run.json          the run record: plan (path, sha256, labels), settings, data, versions, status, metrics
      log.jsonl         every log entry of the Trainer, one JSON object a line
      adapter/          the final PEFT adapter (adapter_config.json, adapter_model.safetensors)
      checkpoint-N/     the Trainer's checkpoints (each with trainer_state.json, written last)
      runs/             TensorBoard's event files

Readers (export, verify) find everything through these functions, never through the literal names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from goraplan.errors import GoraError, first_line
from goraplan.files import check_not_input, write_json_atomic, write_text_atomic
from goraplan.untrusted import printable, read_json_object, strict_json

__all__ = [
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "LOG_FILE",
    "RUN_FILE",
    "adapter_dir",
    "check_not_over_inputs",
    "checkpoint_problem",
    "checkpoints",
    "clear_run",
    "clear_unrecorded",
    "files_of_run",
    "drop_after",
    "label_names",
    "last_complete_checkpoint",
    "log_file",
    "looks_like_run",
    "plan_sha256",
    "resumable_checkpoint",
    "read_lr_search",
    "read_record",
    "record_file",
    "run_of_adapter",
    "save_lr_search",
    "write_record",
    "written_by_gorafit",
]

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file name for a saved adapter's tensors
TENSORBOARD_DIR = "runs"
LR_SEARCH_FILE = "lr_search.json"  # --lr auto: every candidate, its score and the choice (gorafit.lr_finder)
LR_SEARCH_PLOT = "lr_search.png"  # the same as a picture
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a run leaves in its folder: a folder holding any of these holds a run.
_RUN_ARTIFACTS = (RUN_FILE, LOG_FILE, ADAPTER_DIR, TENSORBOARD_DIR, LR_SEARCH_FILE, LR_SEARCH_PLOT)


def record_file(run: Path) -> Path:
    return Path(run) / RUN_FILE


def log_file(run: Path) -> Path:
    return Path(run) / LOG_FILE


def adapter_dir(run: Path) -> Path:
    """The final adapter of a run."""
    return Path(run) / ADAPTER_DIR


def run_of_adapter(adapter: Path) -> Path | None:
    """The run folder an adapter folder is the final adapter of, or None for an adapter on its own."""
    adapter = Path(adapter)
    if adapter.name == ADAPTER_DIR and record_file(adapter.parent).is_file():
        return adapter.parent
    return None


def looks_like_run(folder: Path) -> bool:
    """True when ``folder`` holds (part of) a gorafit run: run.json, log, adapter or checkpoints."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any((folder / name).exists() for name in _RUN_ARTIFACTS) or bool(checkpoints(folder))


# ---------------------------------------------------------------------------------------------------- the record
def read_record(run: Path) -> dict[str, Any] | None:
    """The run's ``run.json``, or None when it has none; a damaged one is a `GoraError`."""
    path = record_file(run)
    return read_json_object(path, "run record") if path.is_file() else None


def write_record(run: Path, record: dict[str, Any]) -> Path:
    """Write ``run.json`` atomically (a reader never sees half of it)."""
    return write_json_atomic(record_file(run), record)


def plan_sha256(record: dict[str, Any]) -> str | None:
    """The sha256 of the plan the run was trained from."""
    plan = record.get("plan")
    return plan.get("sha256") if isinstance(plan, dict) else None


def label_names(record: dict[str, Any]) -> list[str] | None:
    """The class names a seq-cls run was trained with (None for causal-lm)."""
    plan = record.get("plan")
    return plan.get("labels") if isinstance(plan, dict) else None


def save_lr_search(run: Path, search) -> Path:
    """Keep a ``--lr auto`` search (a `gorafit.lr_finder.LrSearch`) beside the run: JSON and picture."""
    from gorafit.lr_finder import save_lr_search as save

    return save(Path(run) / LR_SEARCH_FILE, search, plot_path=Path(run) / LR_SEARCH_PLOT)


def read_lr_search(run: Path):
    """The run's ``--lr auto`` search, or None when its lr was given."""
    from gorafit.lr_finder import read_lr_search as read

    return read(Path(run) / LR_SEARCH_FILE)


# ---------------------------------------------------------------------------------------------------- checkpoints
def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The run's ``checkpoint-N`` folders as (N, path), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` that was written to the end (its trainer state is the last file written).

    A process killed while writing a checkpoint leaves it partial; that one is skipped.
    """
    for _, path in reversed(checkpoints(folder)):
        if (path / "trainer_state.json").is_file() and (path / ADAPTER_WEIGHTS).is_file():
            return path
    return None


def files_of_run(run: Path, args, *, with_lr_search: bool) -> list[str]:
    """The names a run writes in its folder (recorded in run.json: what a later --overwrite may delete)."""
    names = [RUN_FILE, LOG_FILE, ADAPTER_DIR] + ([LR_SEARCH_FILE, LR_SEARCH_PLOT] if with_lr_search else [])
    logging_dir = getattr(args, "logging_dir", None)
    if "tensorboard" in (getattr(args, "report_to", None) or []) and logging_dir and \
            Path(logging_dir).resolve().is_relative_to((Path(run) / TENSORBOARD_DIR).resolve()):
        names.append(TENSORBOARD_DIR)
    return names


def written_by_gorafit(folder: Path) -> list[Path]:
    """What a previous run in `folder` wrote, as its run.json says: the names it lists (an older record: the
    standard layout), and its checkpoints. A folder with run files but no record is refused: nothing says that
    gorafit wrote its ``adapter/`` or ``runs/``.

    The record is untrusted: only names of this layout are taken from it, never a path.
    """
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        found = [name for name in _RUN_ARTIFACTS if (folder / name).exists()] + [p.name for _, p in checkpoints(folder)]
        if found:
            raise GoraError(f"output folder {printable(folder)} holds {printable(found[0])} but no {RUN_FILE} says "
                            "gorafit wrote it: move it away, or choose another --output-dir")
        return []
    names = record.get("files")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = [RUN_FILE, LOG_FILE, ADAPTER_DIR, LR_SEARCH_FILE, LR_SEARCH_PLOT]
    wanted = [folder / name for name in dict.fromkeys(names) if name in _RUN_ARTIFACTS]
    return [p for p in wanted if p.exists() or p.is_symlink()] + [p for _, p in checkpoints(folder)]


def clear_run(folder: Path) -> None:
    """Remove what a previous run wrote (`written_by_gorafit`), and nothing else the folder holds."""
    for path in written_by_gorafit(folder):
        _remove(path)


def clear_unrecorded(folder: Path, *, remove_folder: bool) -> None:
    """After a run that stopped before writing its record: remove the run files it wrote (the folder held no
    run before it: `check_output_dir` saw to that), and the folder itself when the run created it and it is
    left empty."""
    folder = Path(folder)
    for name in _RUN_ARTIFACTS:
        _remove(folder / name)
    for _, path in checkpoints(folder):
        _remove(path)
    if remove_folder and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_not_over_inputs(folder: Path, inputs: list[Path | None]) -> None:
    """One sentence if a file the run writes or replaces in `folder` is an input, holds one or lies inside one
    (the plan, the data, a local model folder): the folder itself may hold inputs beside the run's files."""
    folder = Path(folder)
    written = [folder / name for name in _RUN_ARTIFACTS] + [p for _, p in checkpoints(folder)]
    for given in filter(None, inputs):
        for path in written:
            try:
                check_not_input(path, [given])
            except GoraError:
                raise GoraError(f"the run folder {printable(folder)} would write over the input {printable(given)}: "
                                "choose another --output-dir") from None


def resumable_checkpoint(folder: Path) -> Path:
    """The newest checkpoint that is whole (`checkpoint_problem`): a newer one that a kill cut short or that was
    damaged is passed over (and dropped by `drop_after`). One sentence when there is none."""
    first_problem = None
    for _, path in reversed(checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        first_problem = first_problem or f"{path.name}: {problem}"
    raise GoraError(f"no checkpoint in {printable(folder)} can be resumed from ({printable(first_problem)}): run "
                    "without --resume to start afresh")


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (its trainer state, adapter weights, optimizer or scheduler file), or None.

    It is read before the Trainer unpickles anything from it, so a damaged file is one sentence, not a traceback.
    """
    checkpoint = Path(checkpoint)
    try:
        state = strict_json((checkpoint / "trainer_state.json").read_bytes(), "trainer_state.json")
    except (GoraError, OSError) as exc:
        return str(exc) if isinstance(exc, GoraError) else f"trainer_state.json: {exc.strerror or exc}"
    if not isinstance(state, dict) or type(state.get("global_step")) is not int:
        return "trainer_state.json holds no global_step"
    try:
        from safetensors import safe_open

        with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as f:
            for name in f.keys():
                f.get_slice(name)
    except Exception as exc:  # safetensors raises its own error types for broken headers and sizes
        return f"{ADAPTER_WEIGHTS} is unreadable ({first_line(exc, type(exc).__name__)})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if (checkpoint / name).exists() and not _readable_zip(checkpoint / name):
            return f"{name} is not a readable torch file"
    return None


def _readable_zip(path: Path) -> bool:
    """A torch file (a zip archive) whose members' checksums all match."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def drop_after(folder: Path, checkpoint: Path) -> None:
    """Before resuming: remove partial checkpoints newer than ``checkpoint`` and log lines after its step."""
    step = int(_CHECKPOINT.match(Path(checkpoint).name).group(1))
    for n, path in checkpoints(folder):
        if n > step:
            shutil.rmtree(path)
    log = log_file(folder)
    if log.is_file():
        kept = [line for line in log.read_text(encoding="utf-8").splitlines() if _log_step(line) <= step]
        write_text_atomic(log, "".join(line + "\n" for line in kept))


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # an unreadable (half-written) line goes
