"""Planning a model that no single process holds: the model sharded with FSDP2 (``fully_shard``).

Each of ``W`` processes keeps a slice of the rows (``out_features``) of every weight, and so of every
gradient accumulator: what one process holds of the targets is about ``1/W`` of the whole. The maths
allows it (docs/method.md §1, §2 and §4):

- the gradient: FSDP reduce-scatters each backward's gradient, so the post-accumulate-grad hook of a
  sharded weight receives this process's rows of the gradient summed over processes;
- the importance ``mean(|W ⊙ G|)`` is a sum over entries: each process sums its rows, one all-reduce
  adds the sums;
- ``B = -xi G pinv(A)`` is separable by rows: each process solves for its rows of ``B`` with the same
  seeded ``A``; ``B`` (``out x r``) is small and is gathered whole.

Shards are float32 whatever the compute dtype: FSDP casts the float32 reduction back to the dtype of the
sharded parameter before the hook, so bfloat16 shards would round every summed gradient.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from goraplan import distributed
from goraplan.errors import GoraError

SHARDABLE_IMPORTANCE = ("sensitivity",)

# FSDP and DTensor are imported only where a model may hold them: importing them costs about a third of
# the command line's start-up, and a model cannot be sharded before torch.distributed.fsdp is imported.


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _is_dtensor(t: torch.Tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a part of it) is sharded with FSDP2's ``fully_shard``."""
    return bool(_fsdp_modules(model))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local rows of a sharded tensor, ``t`` itself otherwise."""
    return t.to_local() if _is_dtensor(t) else t


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype forward and backward run in: the mixed-precision ``param_dtype`` of the sharded model, or
    the dtype of its parameters."""
    for module in _fsdp_modules(model)[:1]:
        # FSDP2 has no public getter for the policy it was given.
        param_dtype = module._get_fsdp_state()._mp_policy.param_dtype
        if param_dtype is not None:
            return param_dtype
    return next(model.parameters()).dtype


def shard_model(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard``: each transformer block (the model's
    ``_no_split_modules``), then the rest (embeddings, tied heads, final norm) at the root.

    The shards are float32; forward and backward run in ``compute_dtype`` (default: the dtype the model
    was loaded in) and gradients are reduced in float32.
    """
    if not distributed.initialized():
        raise GoraError("sharding needs a process group: launch with torchrun --nproc_per_node N")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute_dtype = compute_dtype or next(model.parameters()).dtype
    policy = MixedPrecisionPolicy(
        param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32
    )
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_types and m is not model]
    units = _untied_embeddings(model) + blocks  # inner units first: a BERT block holds its embeddings
    for unit in units:
        fully_shard(unit.float(), mp_policy=policy)  # float32 one unit at a time: no full copy
    fully_shard(model.float(), mp_policy=policy)
    return model


def _untied_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output layer, each its own unit when they do not share a weight (then each
    is whole only while it runs). Tied, they stay in the root unit: one weight belongs to one unit."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embeddings, head = (get_in() if get_in else None), (get_out() if get_out else None)
    if embeddings is None or head is None or embeddings.weight is head.weight:
        return []
    return [embeddings, head]


@contextmanager
def gradients_summed(model: nn.Module) -> Iterator[None]:
    """Within the block, FSDP sums gradients over processes instead of averaging them.

    The divide factor alone asks gloo for a ``PREMUL_SUM`` it lacks; forcing sum-only collectives makes
    it a plain sum. FSDP2 exposes setters only, so the previous values are read back from its state.
    """
    groups = [group for module in _fsdp_modules(model) for group in module._get_fsdp_state()._fsdp_param_groups]
    saved = [(g.gradient_divide_factor, g.force_sum_reduction_for_comms) for g in groups]
    try:
        for group in groups:
            group.gradient_divide_factor = 1.0
            group.force_sum_reduction_for_comms = True
        yield
    finally:
        for group, (factor, force) in zip(groups, saved):
            group.gradient_divide_factor, group.force_sum_reduction_for_comms = factor, force


def gather_rows(rows: torch.Tensor, total_rows: int) -> torch.Tensor:
    """The whole tensor, on every process, from each process's consecutive rows (``torch.chunk`` layout:
    chunks of ``ceil(total / W)`` rows, the last ones shorter or empty, as FSDP shards)."""
    world = distributed.world()
    if world == 1:
        return rows
    chunk = math.ceil(total_rows / world)
    padded = rows.new_zeros((chunk, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    device = distributed.collective_device()
    parts = [torch.empty_like(padded, device=device) for _ in range(world)]
    dist.all_gather(parts, padded.to(device))
    sizes = [max(0, min(chunk, total_rows - k * chunk)) for k in range(world)]
    return torch.cat([p[:n].to(rows.device) for p, n in zip(parts, sizes)])


def full_weight(module: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight of one module in ``dtype`` (every process must call this, in the same order)."""
    w = module.weight.detach()
    return (w.full_tensor() if _is_dtensor(w) else w).to(dtype)


def check_importance_metric(metric: str) -> None:
    if metric not in SHARDABLE_IMPORTANCE:
        raise GoraError(
            f"--importance {metric} needs the whole gradient of a module, which a sharded model never holds "
            "in one process; use --importance sensitivity with --fsdp, or plan without --fsdp"
        )
