"""Does a base model match the plan built on it? Checked before training and by `goraplan validate`."""

from __future__ import annotations

import torch
from torch import nn

from goraplan.errors import GoraError
from goraplan.fingerprint import WeightDigests, compare_weight
from goraplan.plan import Plan


class ModelMismatchError(GoraError):
    """The base model differs from the one the plan was built on."""


def check_model_matches(plan: Plan, model: nn.Module, *, check_fingerprint: bool = True) -> str | None:
    """Raise `ModelMismatchError` naming the first module that is missing or differs in shape, or whose
    weight differs from the planned one (`goraplan.fingerprint`: a load of the same checkpoint in another
    dtype still matches). Returns a note when the weights were compared at another dtype's precision.
    """
    found = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    base = plan.manifest.base_model
    for entry in plan.manifest.modules:
        module = found.get(entry.name)
        if not isinstance(module, nn.Linear):
            raise ModelMismatchError(
                f"the model has no linear layer {entry.name} that the plan adapts: it was planned for "
                f"{base.name_or_path}; pass that model, or rebuild the plan for this one"
            )
        shape = (module.out_features, module.in_features)
        if shape != tuple(entry.shape):
            raise ModelMismatchError(
                f"module {entry.name} has shape {list(shape)} but the plan expects {list(entry.shape)}: it was "
                f"planned for {base.name_or_path}; pass that model, or rebuild the plan"
            )
        linears[entry.name] = module
    if not check_fingerprint or not plan.manifest.modules:
        return None
    loaded = str(next(iter(linears.values())).weight.dtype).removeprefix("torch.")
    for entry in plan.manifest.modules:
        planned = WeightDigests(entry.weight_sha256, dict(entry.weight_sha256_rounded))
        verdict = compare_weight(linears[entry.name].weight, planned, base.dtype)
        if verdict == "unknown":
            raise ModelMismatchError(
                f"the model is loaded in {loaded} but the plan was built on a {base.dtype} load and holds no "
                f"{loaded} fingerprint to compare with (dtype may be the only difference): load the model in "
                f"{base.dtype} (--dtype {base.dtype}), rebuild the plan, or pass --ignore-fingerprint"
            )
        if verdict == "differs":
            loads = (f" (planned on a {base.dtype} load, loaded in {loaded}: not the same weights at {loaded} "
                     "precision either)" if loaded != base.dtype else "")
            raise ModelMismatchError(
                f"the weight of {entry.name} differs from the one the plan was built on "
                f"({base.name_or_path}){loads}; use the same weights, rebuild the plan, "
                "or pass --ignore-fingerprint if you know why they differ"
            )
    if loaded == base.dtype:
        return None
    coarser = loaded if torch.finfo(getattr(torch, loaded)).eps > torch.finfo(getattr(torch, base.dtype)).eps \
        else base.dtype
    return f"the plan was built on a {base.dtype} load and the model is loaded in {loaded}: compared at {coarser} precision"
