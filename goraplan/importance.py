"""Layer importance from the accumulated gradient (GoRA, arXiv 2502.12171, eq. 8 and Table 5).

- ``sensitivity`` (default, eq. 8): ``I = mean(|W ⊙ G|)``, the first-order estimate of how much the
  loss changes if the weight were removed, from the pruning literature.
- ``grad-nuclear``: ``||G||_*``.
- ``union-nuclear``: ``||W ⊙ G||_*``.

Then eq. 9 normalises the scores into shares ``a_i = I_i / sum_j I_j``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch

ImportanceMetric = Literal["sensitivity", "grad-nuclear", "union-nuclear"]
IMPORTANCE_METRICS: tuple[str, ...] = get_args(ImportanceMetric)


def importance(weight: torch.Tensor, grad: torch.Tensor, metric: ImportanceMetric = "sensitivity") -> float:
    """Score one layer from its weight ``W`` and accumulated gradient ``G`` (same shape).

    >>> importance(torch.ones(2, 2), torch.full((2, 2), -0.5))
    0.5
    """
    w, g = _float32_pair(weight, grad)
    if metric == "sensitivity":
        return float((w * g).abs().mean())
    if metric == "grad-nuclear":
        return float(torch.linalg.matrix_norm(g, ord="nuc"))
    if metric == "union-nuclear":
        return float(torch.linalg.matrix_norm(w * g, ord="nuc"))
    raise ValueError(f"unknown importance metric {metric!r}; choose one of {', '.join(IMPORTANCE_METRICS)}")


def sensitivity_sum(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """``sum(|W ⊙ G|)`` over the entries given, in float64: a part of eq. 8's mean that rows held
    elsewhere (a sharded model) add to.

    >>> sensitivity_sum(torch.ones(2, 2), torch.full((2, 2), -0.5))
    2.0
    """
    w, g = _float32_pair(weight, grad)
    return float((w * g).abs().sum(dtype=torch.float64))


def _float32_pair(weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` and ``G`` in float32 on one device, after checking that their shapes agree."""
    if weight.shape != grad.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and gradient {tuple(grad.shape)} differ in shape")
    w = weight.detach().to(torch.float32)
    return w, grad.detach().to(w.device, torch.float32)


def normalise(scores: Mapping[str, float]) -> dict[str, float]:
    """Eq. 9: shares that sum to one. All-zero scores (no gradient signal) give equal shares.

    >>> normalise({"a": 1.0, "b": 3.0})
    {'a': 0.25, 'b': 0.75}
    """
    total = sum(scores.values())
    if total <= 0:
        return {name: 1.0 / len(scores) for name in scores}
    return {name: score / total for name, score in scores.items()}
