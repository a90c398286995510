"""Gradient-compressing initialisation (GoRA, arXiv 2502.12171, eqs. 11-13 and Appendix A).

PEFT layout: ``A`` is ``[r, n]``, ``B`` is ``[m, r]`` and the adapter adds ``s * B @ A`` to ``W``
with rsLoRA scaling ``s = alpha / sqrt(r)``.

- ``A`` is random, PEFT's default LoRA-A init (kaiming-uniform with a=sqrt(5): bound ``1/sqrt(n)``).
- ``B = -xi * G @ pinv(A)``, ``pinv(A) = A^T (A A^T)^{-1}`` (eq. 11), so ``B @ A = -xi * G @ P`` with
  ``P`` the orthogonal projector on the row space of ``A``: the least-squares best ``X @ A`` for
  ``-xi * G`` (Appendix A.1).
- A random ``r``-dimensional projection keeps about ``sqrt(r/n)`` of the Frobenius norm (Appendix
  A.2), so ``xi = gamma * sqrt(n / r) / s = gamma * sqrt(n) / alpha`` makes ``s * B @ A`` about one
  gradient-descent step ``-gamma * G`` (eq. 13). The minus sign makes it a descent step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lora_scaling(alpha: float, rank: int) -> float:
    """rsLoRA scaling ``alpha / sqrt(r)``.

    >>> lora_scaling(16, 4)
    8.0
    """
    return alpha / math.sqrt(rank)


def step_scale(gamma: float, in_features: int, alpha: float) -> float:
    """``xi = gamma * sqrt(n) / alpha`` (eq. 13 with rsLoRA scaling).

    >>> round(step_scale(0.05, 576, 16), 9)
    0.075
    """
    return gamma * math.sqrt(in_features) / alpha


def random_lora_a(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default ``lora_A`` init, kaiming-uniform(a=sqrt(5)): uniform on ``±1/sqrt(n)``, float32."""
    bound = 1.0 / math.sqrt(in_features)
    a = torch.rand(rank, in_features, generator=generator, dtype=torch.float32)
    return a.mul_(2 * bound).sub_(bound)


def compress_gradient(grad: torch.Tensor, lora_a: torch.Tensor, xi: float, ridge: float = 1e-8) -> torch.Tensor:
    """``B = -xi * G @ pinv(A)`` computed with a solve in float64, returned in float32.

    ``G @ A^T (A A^T)^{-1}`` is the transpose of ``(A A^T)^{-1} A G^T``, which one Cholesky-backed
    solve gives without forming an inverse. The ridge (relative to the mean diagonal) only guards
    against a numerically singular ``A A^T``.
    """
    g = grad.detach().to(torch.float64)
    a = lora_a.detach().to(g.device, torch.float64)
    gram = a @ a.T
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    b_t = torch.linalg.solve(gram, a @ g.T)
    return (-xi * b_t.T).to(torch.float32).contiguous()


@dataclass(frozen=True)
class GoraInit:
    """One module's initial adapter: ``A``, and ``B`` for any step size gamma.

    ``B = -xi * G @ pinv(A)`` with ``xi = gamma * sqrt(n) / alpha`` (eqs. 11 and 13). ``xi`` is linear in
    gamma, so the solve is done once, at gamma 1 (``unit_b``), and ``lora_b(gamma)`` scales it:
    ``--step-size auto`` tries every candidate gamma for the price of one solve.

    Every row of ``B`` comes from the same row of ``G``: a process that holds only some rows of ``G``
    (a sharded model) solves for exactly those rows of ``B`` with the same ``A``.
    """

    lora_a: torch.Tensor
    unit_b: torch.Tensor

    def lora_b(self, gamma: float) -> torch.Tensor:
        """``B = -xi * G @ pinv(A)`` at step size ``gamma``."""
        return gamma * self.unit_b


def solve_init(grad: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> GoraInit:
    """Draw ``A`` from ``generator`` and solve for ``B`` at gamma 1, for the gradient ``grad`` (``[out, in]``,
    or some of its rows)."""
    _, in_features = grad.shape
    lora_a = random_lora_a(rank, in_features, generator)
    return GoraInit(lora_a, compress_gradient(grad.cpu(), lora_a, step_scale(1.0, in_features, alpha)))


def gora_init(
    grad: torch.Tensor, rank: int, alpha: float, gamma: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(A, B)`` for one module whose accumulated gradient is ``grad`` (``[out, in]``)."""
    init = solve_init(grad, rank, alpha, generator)
    return init.lora_a, init.lora_b(gamma)
