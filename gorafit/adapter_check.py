"""Checking the adapter a run saved against its plan, on disk, before the run calls itself complete."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from gorafit.run_folder import ADAPTER_WEIGHTS
from goraplan.errors import GoraError
from goraplan.plan import Plan

__all__ = ["check_saved_adapter"]


def check_saved_adapter(adapter_dir: Path, plan: Plan, *, head: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every planned ``lora_A`` / ``lora_B`` present in the saved adapter with its planned shape (and the
    classification head, for seq-cls); returns every tensor's shape. Under FSDP or ZeRO-3 an adapter saved
    without gathering is empty or sharded: that is an error, never a silent success.

    >>> check_saved_adapter(Path("runs/plan/adapter"), load_plan("plan.gora"))  # doctest: +SKIP
    """
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
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
