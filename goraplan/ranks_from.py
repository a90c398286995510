"""Ranks reused on new data (``goraplan build --ranks-from OTHER``).

Another plan's allocation (which modules, at which rank) is the shared asset; this run computes the
gradients, importance and initial adapter on its own data and keeps those ranks instead of allocating.
That only makes sense on a model with the same modules and shapes, which is checked before any gradient.

>>> other = load_plan("team-a/sarcasm-plan")                                  # doctest: +SKIP
>>> settings = adopt_allocation(PlanSettings(steps=64), other)                # doctest: +SKIP
>>> plan = build_plan(model, batches, settings, fixed_ranks=reusable_ranks(other, model))  # doctest: +SKIP
>>> plan = record_ranks_source(plan, other, "team-a/sarcasm-plan")           # doctest: +SKIP
"""

from __future__ import annotations

from torch import nn

from goraplan.errors import GoraError
from goraplan.plan import Plan, RanksSource
from goraplan.settings import PlanSettings
from goraplan.targets import find_target_modules
from goraplan.untrusted import printable

__all__ = ["ALLOCATION_FIELDS", "adopt_allocation", "reusable_ranks", "record_ranks_source"]

# What the other plan decides: which modules (and so the budget) and the rank bounds it allocated within.
ALLOCATION_FIELDS = ("target_modules", "rank", "min_rank", "max_rank", "serve_rank", "allocation")


def adopt_allocation(settings: PlanSettings, other: Plan) -> PlanSettings:
    """`settings` with the other plan's target modules, r0, rank bounds and allocation mode.

    >>> adopt_allocation(PlanSettings(rank=4), other).rank  # doctest: +SKIP
    8
    """
    theirs = other.manifest.settings
    return settings.model_copy(update={name: getattr(theirs, name) for name in ALLOCATION_FIELDS})


def reusable_ranks(other: Plan, model: nn.Module, source: str | None = None) -> dict[str, int]:
    """The other plan's ranks, once `model` is shown to have exactly its modules, with the same shapes.

    One sentence otherwise: a module the plan adapts is missing, the model has a target module the plan
    lacks, or a shape differs.
    """
    where = printable(source or "the other plan")
    planned = {m.name: m for m in other.manifest.modules}
    try:
        found = find_target_modules(model, other.manifest.target_modules)
    except GoraError:
        found = {}
    missing = [name for name in planned if name not in found]
    if missing:
        raise GoraError(f"cannot reuse the ranks of {where}: this model has no module {printable(missing[0])} "
                        f"({len(missing)} of its {len(planned)} modules are missing); ranks carry over only to a "
                        "model with the same modules and shapes.")
    extra = [name for name in found if name not in planned]
    if extra:
        raise GoraError(f"cannot reuse the ranks of {where}: this model also has the target module "
                        f"{printable(extra[0])}, which that plan does not rank ({len(extra)} such modules); ranks "
                        "carry over only to a model with the same modules and shapes.")
    for name, module in found.items():
        shape = (module.out_features, module.in_features)
        if shape != tuple(planned[name].shape):
            raise GoraError(f"cannot reuse the ranks of {where}: module {printable(name)} is {shape[0]}x{shape[1]} "
                            f"here but {planned[name].shape[0]}x{planned[name].shape[1]} in that plan; ranks carry "
                            "over only to a model with the same modules and shapes.")
    return {name: planned[name].rank for name in found}


def record_ranks_source(plan: Plan, other: Plan, source: str) -> Plan:
    """`plan` with its manifest recording that its ranks came from `other` (given on the command line as `source`)."""
    if other.sha256 is None:
        raise GoraError("the plan the ranks come from has no file (it was never saved): save it first.")
    plan.manifest = plan.manifest.model_copy(update={"ranks_from": RanksSource(
        source=source,
        plan_sha256=other.sha256,
        calibration_source=other.manifest.calibration.source,
        token_fingerprint=other.manifest.calibration.token_fingerprint,
    )})
    return plan
