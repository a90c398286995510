"""Does a base model match the plan built on it? Checked before training and by `goraplan validate`."""

from __future__ import annotations

from torch import nn

from goraplan.errors import GoraError
from goraplan.plan import Plan
from goraplan.targets import weight_digest


class ModelMismatchError(GoraError):
    """The base model differs from the one the plan was built on."""


def check_model_matches(plan: Plan, model: nn.Module, *, check_fingerprint: bool = True) -> None:
    """Raise `ModelMismatchError` naming the first module that is missing or differs in shape, or a
    fingerprint mismatch (same shapes, other weights). The fingerprint hashes float32 casts, so the same
    weights loaded in another dtype whose cast is exact still match.
    """
    found = dict(model.named_modules())
    linears: dict[str, nn.Linear] = {}
    for entry in plan.manifest.modules:
        module = found.get(entry.name)
        if not isinstance(module, nn.Linear):
            raise ModelMismatchError(
                f"the model has no linear layer {entry.name} that the plan adapts: it was planned for "
                f"{plan.manifest.base_model.name_or_path}; pass that model, or rebuild the plan for this one"
            )
        shape = (module.out_features, module.in_features)
        if shape != tuple(entry.shape):
            raise ModelMismatchError(
                f"module {entry.name} has shape {list(shape)} but the plan expects {list(entry.shape)}: it was "
                f"planned for {plan.manifest.base_model.name_or_path}; pass that model, or rebuild the plan"
            )
        linears[entry.name] = module
    if not check_fingerprint:
        return
    for entry in plan.manifest.modules:
        if weight_digest(linears[entry.name]) != entry.weight_sha256:
            raise ModelMismatchError(
                f"the weight of {entry.name} differs from the one the plan was built on "
                f"({plan.manifest.base_model.name_or_path}); use the same weights, rebuild the plan, "
                "or pass --ignore-fingerprint if you know why they differ"
            )
