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

from goraplan.files import write_json_atomic, write_text_atomic
from goraplan.untrusted import read_json_object

__all__ = [
    "ADAPTER_DIR",
    "ADAPTER_WEIGHTS",
    "LOG_FILE",
    "RUN_FILE",
    "adapter_dir",
    "checkpoints",
    "clear_run",
    "drop_after",
    "label_names",
    "last_complete_checkpoint",
    "log_file",
    "looks_like_run",
    "plan_sha256",
    "read_lr_search",
    "read_record",
    "record_file",
    "run_of_adapter",
    "save_lr_search",
    "write_record",
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


def clear_run(folder: Path) -> None:
    """Remove what a previous run left (and nothing else the folder may hold)."""
    folder = Path(folder)
    for name in _RUN_ARTIFACTS:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for _, path in checkpoints(folder):
        shutil.rmtree(path)


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
