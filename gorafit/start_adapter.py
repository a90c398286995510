"""A plan's untrained starting adapter as a PEFT adapter folder, for tools that take an adapter path.

TRL, axolotl (``lora_model_dir``), LLaMA-Factory (``adapter_name_or_path``) and PEFT itself
(``PeftModel.from_pretrained(base, DIR, is_trainable=True)``) start training from a saved adapter; a
``LoraConfig`` alone cannot carry GoRA's initial A and B (`gorafit.apply.lora_config_for` says so). This
folder loads exactly as `gorafit.apply_plan` wraps the base model: the same ranks, scalings and tensors.

A causal-LM plan needs no model: its adapter is the plan's tensors under PEFT's names. A seq-cls plan also
starts the classification head, which PEFT trains and saves beside the adapter, so the base model is
loaded (with the plan's seed, the head the gradients were taken with) and PEFT saves the wrapped model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gorafit.apply import apply_plan, plan_lora_config
from goraplan.files import staged_dir
from goraplan.plan import Plan, load_plan

__all__ = ["START_RECORD", "write_start_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
START_RECORD = "gora_start.json"  # which plan the folder starts from


def write_start_adapter(plan: Plan | str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                        base: str | None = None, trust_remote_code: bool = False) -> Path:
    """Write `plan`'s starting adapter into the folder `out` (written whole or not at all).

    `base` replaces the plan's base model where one is loaded (seq-cls plans); it must be the same weights.

    >>> write_start_adapter("plan.gora", "start-adapter")  # doctest: +SKIP
    >>> model = PeftModel.from_pretrained(base_model, "start-adapter", is_trainable=True)  # doctest: +SKIP
    """
    plan_path = None if isinstance(plan, Plan) else Path(plan).expanduser()
    plan = plan if isinstance(plan, Plan) else load_plan(plan_path)
    out = Path(out).expanduser()
    manifest = plan.manifest
    with staged_dir(out, overwrite=overwrite, inputs=[plan_path]) as tmp:
        if manifest.task == "seq-cls":
            _save_with_peft(plan, tmp, base, trust_remote_code)
        else:
            _save_tensors(plan, tmp)
        record = {"plan": str(plan_path.resolve()) if plan_path else None, "plan_sha256": plan.sha256,
                  "base_model": manifest.base_model.name_or_path, "revision": manifest.base_model.revision,
                  "task": manifest.task, "trained": False}
        (tmp / START_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def _save_tensors(plan: Plan, folder: Path) -> None:
    """The adapter as PEFT saves it: the config, and each module's A and B under PEFT's state-dict names."""
    from safetensors.torch import save_file

    config = plan_lora_config(plan)
    config.base_model_name_or_path = plan.manifest.base_model.name_or_path
    config.target_modules = [m.name for m in plan.manifest.modules]  # the plan's order: a reproducible file
    config.inference_mode = True  # as PEFT writes it; from_pretrained(is_trainable=True) turns it off
    config.save_pretrained(str(folder))
    tensors = {}
    for m in plan.manifest.modules:
        tensors[f"base_model.model.{m.name}.lora_A.weight"] = plan.lora_a(m.name).contiguous()
        tensors[f"base_model.model.{m.name}.lora_B.weight"] = plan.lora_b(m.name).contiguous()
    metadata = {"format": "pt", "gora.start_of_plan": plan.sha256 or ""}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata=metadata)


def _save_with_peft(plan: Plan, folder: Path, base: str | None, trust_remote_code: bool) -> None:
    from goraplan.models import load_model, plan_base_model

    manifest = plan.manifest
    name, revision = plan_base_model(manifest.base_model.name_or_path, manifest.base_model.revision, base, None)
    model, _ = load_model(name, manifest.task, label_names=manifest.labels, seed=manifest.settings.seed,
                          trust_remote_code=trust_remote_code, revision=revision)
    peft_model = apply_plan(model, plan)
    peft_model.save_pretrained(str(folder))
