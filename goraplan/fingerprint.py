"""Is a loaded weight the one a plan was built on, whatever dtype it was loaded in?

A plan records, per target weight, the sha256 of its float32 bytes at the planning dtype (``exact``) and
of the same weight rounded to each coarser dtype (``rounded``: bfloat16, float16). Loading a checkpoint
in a coarser dtype rounds each weight to nearest, as ``Tensor.to`` does, so the bfloat16 load of the
checkpoint a float32 plan was built on hashes to the plan's ``rounded["bfloat16"]``; a float32 load of
the checkpoint a bfloat16 plan was built on, rounded to bfloat16 here, hashes to the plan's ``exact``.
Another checkpoint still differs, unless it differs from this one by less than the coarser dtype resolves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from goraplan.targets import tensor_digest

__all__ = ["ROUNDED_DTYPES", "WeightDigests", "compare_weight", "weight_digests"]

# Coarser dtypes a plan records digests for, finest first: the loads people use besides float32.
ROUNDED_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}  # mantissa bits

Verdict = Literal["same", "differs", "unknown"]


@dataclass(frozen=True)
class WeightDigests:
    """sha256 (of float32 bytes) of one weight as planned, and rounded to each coarser dtype."""

    exact: str
    rounded: dict[str, str] = field(default_factory=dict)


def _finer(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether dtype `a` holds every value of `b` (float32 holds bfloat16 and float16, not each other)."""
    if a == b:
        return True
    if {a, b} == {torch.float16, torch.bfloat16}:
        return False
    return _BITS.get(a, 0) > _BITS.get(b, 0)


def weight_digests(weight: torch.Tensor) -> WeightDigests:
    """The digests a plan records for one weight: exact at its dtype, and rounded to the coarser ones.

    >>> d = weight_digests(torch.tensor([[1.0, 1.0 + 2**-10]]))
    >>> sorted(d.rounded)
    ['bfloat16', 'float16']
    >>> d.rounded["bfloat16"] == weight_digests(torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)).exact
    True
    """
    w = weight.detach()
    rounded = {name: tensor_digest(w.to(dtype)) for name, dtype in ROUNDED_DTYPES.items()
               if dtype != w.dtype and _finer(w.dtype, dtype)}
    return WeightDigests(tensor_digest(w), rounded)


def compare_weight(weight: torch.Tensor, planned: WeightDigests, planned_dtype: str) -> Verdict:
    """``same`` when `weight` is the planned weight in its own dtype, ``differs`` when it is not, and
    ``unknown`` when the plan holds no digest that a weight of this dtype can be compared with (a plan
    from before rounded digests, or float16 against bfloat16).

    >>> planned = weight_digests(torch.tensor([[0.1, 0.2]]))
    >>> compare_weight(torch.tensor([[0.1, 0.2]], dtype=torch.bfloat16), planned, "float32")
    'same'
    >>> compare_weight(torch.tensor([[0.1, 0.3]], dtype=torch.bfloat16), planned, "float32")
    'differs'
    """
    w = weight.detach()
    plan_dtype = getattr(torch, planned_dtype, None)
    if not isinstance(plan_dtype, torch.dtype) or w.dtype == plan_dtype:
        return "same" if tensor_digest(w) == planned.exact else "differs"
    if _finer(plan_dtype, w.dtype):  # loaded coarser than planned: the plan's rounding of its weights
        name = next((n for n, d in ROUNDED_DTYPES.items() if d == w.dtype), None)
        if name not in planned.rounded:
            return "unknown"
        return "same" if tensor_digest(w) == planned.rounded[name] else "differs"
    if _finer(w.dtype, plan_dtype):  # loaded finer than planned: round it the way the planned load did
        return "same" if tensor_digest(w.to(plan_dtype)) == planned.exact else "differs"
    return "unknown"
