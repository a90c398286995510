"""Lower an adapter's largest rank: each module's update ``s*B@A`` replaced by its best rank-R approximation.

vLLM pads every adapter to the server's ``--max-lora-rank``, so what a GoRA adapter costs to serve
is set by its largest rank (docs/method.md, "Export and serve"). Compressing to a smaller rank R
lowers that cost, at a price this module measures rather than hides.

For a module with update ``dW = s * B @ A`` (PEFT layout: ``A`` is ``[r, n]``, ``B`` is ``[m, r]``)
and ``r > R``, the best rank-R approximation in Frobenius (and spectral) norm is the truncated SVD
``dW_R = U_R diag(sigma_R) V_R^T`` (Eckart-Young), and what it loses is exactly the discarded
singular values: ``||dW - dW_R||_F = sqrt(sum_{k>R} sigma_k^2)``. The SVD is taken through QR
factors of ``B`` and ``A^T``, so it costs ``O((m + n) r^2)``, never an ``m x n`` matrix.

The new factors follow PEFT's convention for rank R: the module keeps its alpha, its scaling
becomes ``s' = alpha / sqrt(R)`` (rsLoRA) or ``alpha / R``, and ``s'`` is divided out of the factors,
``B' = U_R sqrt(sigma_R) / s'``, ``A' = sqrt(sigma_R) V_R^T``, so ``s' * B' @ A'`` equals ``dW_R``.
Splitting ``sigma`` evenly keeps both factors on the same scale (what low-precision weights want).

Everything here is pure: tensors and config dicts in, new ones out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gorafit.saved_adapter import (
    lora_modules,
    module_pattern_key,
    module_ranks,
    module_scalings,
    pattern_value,
)
from goraplan.errors import GoraError

__all__ = [
    "ModuleCompression",
    "CompressionReport",
    "update_singular_values",
    "truncate_lora",
    "compress_adapter",
]


@dataclass(frozen=True)
class ModuleCompression:
    """One module: its rank before and after, and the Frobenius norm of its update before and after."""

    module: str
    rank: int
    new_rank: int
    norm: float  # ||s * B @ A||_F
    kept_norm: float  # ||truncated update||_F

    @property
    def kept(self) -> float:
        """The fraction of the update's Frobenius norm kept (1.0 for an untouched or zero update)."""
        return self.kept_norm / self.norm if self.norm > 0 else 1.0

    @property
    def error(self) -> float:
        """``||dW - dW_R||_F``: the root of the sum of squares of the discarded singular values."""
        return math.sqrt(max(self.norm**2 - self.kept_norm**2, 0.0))

    @property
    def relative_error(self) -> float:
        """``||dW - dW_R||_F / ||dW||_F`` (0.0 for an untouched or zero update)."""
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class CompressionReport:
    """What `compress_adapter` did, per module and in total."""

    max_rank: int
    modules: tuple[ModuleCompression, ...]

    @property
    def compressed(self) -> tuple[ModuleCompression, ...]:
        """The modules whose rank was lowered."""
        return tuple(m for m in self.modules if m.new_rank < m.rank)

    @property
    def kept(self) -> float:
        """Fraction of the whole adapter's update norm kept: ``sqrt(sum kept_i^2) / sqrt(sum norm_i^2)``."""
        total = math.sqrt(sum(m.norm**2 for m in self.modules))
        return math.sqrt(sum(m.kept_norm**2 for m in self.modules)) / total if total > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """The whole adapter's ``sqrt(sum ||dW_i - dW_i,R||^2) / sqrt(sum ||dW_i||^2)``."""
        total = math.sqrt(sum(m.norm**2 for m in self.modules))
        return math.sqrt(sum(m.error**2 for m in self.modules)) / total if total > 0 else 0.0

    @property
    def worst(self) -> ModuleCompression | None:
        """The compressed module that kept the smallest fraction of its norm."""
        return min(self.compressed, key=lambda m: m.kept, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_rank": self.max_rank,
            "modules_compressed": len(self.compressed),
            "modules": len(self.modules),
            "norm_kept_total": self.kept,
            "relative_error_total": self.relative_error,
            "per_module": {m.module: {"rank": m.rank, "new_rank": m.new_rank, "norm": m.norm, "norm_kept": m.kept,
                                      "error": m.error, "relative_error": m.relative_error} for m in self.modules},
        }

    def summary(self) -> str:
        """One sentence for the CLI."""
        if not self.compressed:
            return (f"Every module's rank is already at most {self.max_rank}: nothing compressed, the update is "
                    f"unchanged.")
        worst = self.worst
        assert worst is not None
        return (f"Compressed {len(self.compressed)} of {len(self.modules)} modules to rank {self.max_rank} by "
                f"truncated SVD: {100 * self.kept:.3f}% of the adapter's update norm kept in total (what was dropped "
                f"is {100 * self.relative_error:.2f}% of it); lowest {100 * worst.kept:.3f}% (dropped "
                f"{100 * worst.relative_error:.2f}%) in {worst.module} (rank {worst.rank}).")


def _svd_of_product(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B @ A = U diag(sigma) V^T`` in float64 without forming ``B @ A``: QR of both factors, SVD of an r x r core."""
    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.to(torch.float64).T)
    u, sigma, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, sigma, vh @ qa.T


def update_singular_values(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The singular values of ``scaling * B @ A``, largest first (float64, length ``min(r, m, n)``).

    >>> A, B = torch.eye(2, 3), torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> update_singular_values(A, B, 2.0).tolist()
    [6.0, 2.0]
    """
    return _svd_of_product(A, B)[1] * abs(scaling)


def truncate_lora(
    A: torch.Tensor, B: torch.Tensor, scaling: float, rank: int, new_scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New factors ``(A', B')`` of rank `rank` with ``new_scaling * B' @ A'`` the best rank-`rank` approximation
    of ``scaling * B @ A``, plus all singular values of ``scaling * B @ A`` (float64, largest first).

    The factors keep the dtype of `A` and `B`. A `rank` at or above the current rank re-factors the update
    exactly (up to rounding).

    >>> A, B = torch.randn(8, 20, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    >>> A2, B2, sigma = truncate_lora(A, B, 2.0, 3, 1.5)
    >>> tuple(A2.shape), tuple(B2.shape)
    ((3, 20), (12, 3))
    >>> error = torch.linalg.matrix_norm(2.0 * B @ A - 1.5 * B2 @ A2)
    >>> bool(torch.isclose(error, sigma[3:].square().sum().sqrt()))
    True
    """
    if rank < 1:
        raise GoraError(f"the rank to compress to must be at least 1 (got {rank}).")
    if new_scaling == 0:
        raise GoraError("the new scaling is 0, so no factors can carry the update: give the module a non-zero alpha.")
    u, sigma, vh = _svd_of_product(A, B)
    sigma = sigma * abs(scaling)
    sign = -1.0 if scaling < 0 else 1.0
    keep = min(rank, sigma.numel())
    root = sigma[:keep].sqrt()
    new_a = root[:, None] * vh[:keep]
    new_b = (sign / new_scaling) * u[:, :keep] * root[None, :]
    if keep < rank:  # the update has fewer singular directions than `rank`: pad with zero rank-1 terms
        new_a = torch.cat([new_a, new_a.new_zeros(rank - keep, new_a.shape[1])])
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - keep)], dim=1)
    return new_a.to(A.dtype).contiguous(), new_b.to(B.dtype).contiguous(), sigma


def _scaling_for(config: dict[str, Any], alpha: float, rank: int) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def compress_adapter(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], max_rank: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], CompressionReport]:
    """Lower every module whose rank exceeds `max_rank` to `max_rank` by truncated SVD of its update.

    Returns a new ``adapter_config.json`` dict, new tensors and a report; the inputs are not changed.
    When a module is compressed, ``rank_pattern`` and ``alpha_pattern`` are rewritten with one key
    per module (its escaped full path), so each module's rank matches its tensors and its alpha
    (hence the scaling PEFT and vLLM compute) is the one it had. When no module exceeds `max_rank`,
    config and tensors come back unchanged.

    >>> new_config, new_tensors, report = compress_adapter(config, tensors, 16)  # doctest: +SKIP
    >>> report.summary()  # doctest: +SKIP
    'Compressed 37 of 120 modules to rank 16 by truncated SVD: 97.41% of the update norm kept in total; ...'
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise GoraError(f"--max-rank must be a positive integer (got {max_rank!r}).")
    if config.get("use_dora"):
        raise GoraError("a DoRA adapter cannot be compressed (its magnitude vector depends on the full update): "
                        "export it without --max-rank.")
    ranks = module_ranks(config, tensors)
    scalings = module_scalings(config, ranks)
    keys = lora_modules(tensors)
    new_tensors = dict(tensors)
    alphas: dict[str, float] = {}
    results = []
    for module, rank in ranks.items():
        alpha = pattern_value(config.get("alpha_pattern") or {}, module)
        alphas[module] = config["lora_alpha"] if alpha is None else alpha
        key_a, key_b = keys[module]["A"], keys[module]["B"]
        if rank <= max_rank:
            sigma = update_singular_values(tensors[key_a], tensors[key_b], scalings[module])
            norm = float(sigma.square().sum().sqrt())
            results.append(ModuleCompression(module, rank, rank, norm, norm))
            continue
        new_a, new_b, sigma = truncate_lora(tensors[key_a], tensors[key_b], scalings[module], max_rank,
                                            _scaling_for(config, alphas[module], max_rank))
        new_tensors[key_a], new_tensors[key_b] = new_a, new_b
        results.append(ModuleCompression(module, rank, max_rank, float(sigma.square().sum().sqrt()),
                                         float(sigma[:max_rank].square().sum().sqrt())))
    report = CompressionReport(max_rank, tuple(results))
    if not report.compressed:
        return dict(config), dict(tensors), report
    new_ranks = {m.module: m.new_rank for m in results}
    new_config = dict(config)
    new_config.update(
        r=min(int(config["r"]), max_rank),
        rank_pattern={module_pattern_key(m): r for m, r in new_ranks.items()},
        alpha_pattern={module_pattern_key(m): alphas[m] for m in new_ranks if alphas[m] != config["lora_alpha"]},
    )
    return new_config, new_tensors, report
