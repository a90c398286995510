"""Stage 1 end to end: accumulated gradients -> importance -> ranks -> initial A/B -> `Plan`.

The maths lives in `importance`, `allocate` and `init`; this module only wires it to a model. A model
sharded with FSDP (`goraplan.sharded`) takes the same steps: each rank holds its rows of every gradient,
the importance sums are added over the ranks, the ranks are decided once on rank 0, and each rank solves
its rows of ``B`` before they are gathered (docs/method.md §1-§5).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from goraplan import distributed, sharded
from goraplan.allocate import allocate_ranks, lora_budget
from goraplan.errors import GoraError
from goraplan.fingerprint import WeightDigests, weight_digests
from goraplan.gradients import GradientResult, accumulate_gradients
from goraplan.hooked_gradients import dense_weight
from goraplan.importance import importance, normalise, sensitivity_sum
from goraplan.init import GoraInit, lora_scaling, solve_init
from goraplan.plan import (
    BaseModelInfo,
    CalibrationInfo,
    Manifest,
    ModulePlan,
    Plan,
    Totals,
    tensor_sha256,
    utc_now,
)
from goraplan.settings import PlanSettings
from goraplan.step_size import StepSizeSearch, search_step_size
from goraplan.targets import find_target_modules, weight_fingerprint


def module_generator(seed: int, module: str) -> torch.Generator:
    """A generator for one module's ``A``, independent of which other modules a plan targets."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(derived)


def peak_memory_mb(device: torch.device | str) -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, resident set size on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_plan(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    settings: PlanSettings | None = None,
    *,
    model_name: str | None = None,
    data_source: str | None = None,
    data_split: str | None = None,
    labels: list[str] | None = None,
    progress: Callable[[int, float], None] | None = None,
    fixed_ranks: Mapping[str, int] | None = None,
    model_revision: str | None = None,
) -> Plan:
    """Build a GoRA plan for ``model`` from ``settings.steps`` calibration batches.

    ``batches`` is any iterable of dicts that ``model(**batch)`` accepts and whose output has
    ``.loss``. The model's weights are not changed. ``model`` may be sharded with FSDP2
    (``goraplan.sharded.shard_model``); then every rank calls this with its own copy of the batches.

    ``fixed_ranks`` (module path -> rank, e.g. another plan's ``ranks``) replaces the allocation step: the
    target modules must be exactly its keys, and gradients, importance and the initial adapter still come
    from ``batches``. ``model_revision`` is the Hub commit the model was loaded at, for the manifest.

    >>> plan = build_plan(model, batches, PlanSettings(rank=8, steps=16))  # doctest: +SKIP
    >>> plan.save("plan.gora")                                             # doctest: +SKIP
    """
    settings = (settings or PlanSettings()).resolved()
    modules = find_target_modules(model, settings.target_modules)
    _check_fixed_ranks(fixed_ranks, modules)
    if sharded.is_sharded(model):
        sharded.check_importance_metric(settings.importance)
    batch_iter = iter(batches)
    timings: dict[str, float] = {}
    with _timed(timings, "gradients_s"):
        result = accumulate_gradients(
            model, batch_iter, modules, settings.steps, offload=settings.offload_gradients,
            gradient_checkpointing=settings.gradient_checkpointing, progress=progress,
        )
    with _timed(timings, "importance_s"):
        scores = module_importance(model, modules, result.grads, settings.importance)
        shares = normalise(scores)
    with _timed(timings, "allocation_s"):
        costs = {name: m.out_features + m.in_features for name, m in modules.items()}
        ranks = distributed.from_main(lambda: dict(fixed_ranks) if fixed_ranks is not None else allocate_ranks(
            shares, costs, settings.rank, settings.min_rank, settings.max_rank, settings.allocation,
            caps={name: min(m.out_features, m.in_features) for name, m in modules.items()}))
    with _timed(timings, "init_s"):
        inits = initial_adapters(model, modules, result.grads, ranks, settings)
    search = None
    if settings.step_size == "auto":
        with _timed(timings, "step_size_search_s"):
            search = _search_step_size(model, modules, inits, ranks, batch_iter, settings)
    gamma = search.chosen if search else settings.step_size
    tensors = {}
    for name, init in inits.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = init.lora_a, init.lora_b(gamma)
    manifest = assemble_manifest(
        model, modules, settings, result, scores, shares, ranks, search, tensors,
        model_name=model_name, model_revision=model_revision, data_source=data_source, data_split=data_split,
        labels=labels,
    )
    plan = Plan(manifest, tensors)
    plan.stats = {**timings, "peak_memory_mb": peak_memory_mb(next(model.parameters()).device)}
    return plan


def module_importance(
    model: nn.Module, modules: dict[str, nn.Linear], grads: dict[str, torch.Tensor], metric: str
) -> dict[str, float]:
    """Eq. 8 for every module. On a sharded model each rank sums ``|W ⊙ G|`` over its rows at the compute
    dtype, and one all-reduce adds the sums of every module."""
    if not sharded.is_sharded(model):
        return {name: importance(dense_weight(m), grads[name], metric) for name, m in modules.items()}
    dtype = sharded.compute_dtype(model)
    local_sums = [sensitivity_sum(sharded.local(m.weight).to(dtype), grads[name]) for name, m in modules.items()]
    sums = distributed.sum_over_ranks(local_sums)
    return {name: total / m.weight.numel() for (name, m), total in zip(modules.items(), sums)}


def initial_adapters(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    grads: dict[str, torch.Tensor],
    ranks: dict[str, int],
    settings: PlanSettings,
) -> dict[str, GoraInit]:
    """Eqs. 11-13 for every module, with ``A`` seeded per module. On a sharded model a rank holding some
    rows of ``G`` solves for the same rows of ``B``; the rows are then gathered, so that every rank holds
    the whole (small) ``B``."""
    inits = {name: solve_init(grads[name], ranks[name], settings.alpha, module_generator(settings.seed, name))
             for name in modules}
    if sharded.is_sharded(model):
        inits = {name: GoraInit(init.lora_a, sharded.gather_rows(init.unit_b, modules[name].out_features))
                 for name, init in inits.items()}
    return inits


def assemble_manifest(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    settings: PlanSettings,
    result: GradientResult,
    scores: dict[str, float],
    shares: dict[str, float],
    ranks: dict[str, int],
    search: StepSizeSearch | None,
    tensors: dict[str, torch.Tensor],
    *,
    model_name: str | None,
    model_revision: str | None,
    data_source: str | None,
    data_split: str | None,
    labels: list[str] | None,
) -> Manifest:
    """Everything needed to understand, check and reproduce the plan."""
    digests = _weight_digests(model, modules)
    costs = {name: m.out_features + m.in_features for name, m in modules.items()}
    budget = lora_budget(costs, settings.rank)
    allocated = sum(ranks[n] * costs[n] for n in modules)
    config = getattr(model, "config", None)
    return Manifest(
        created_at=utc_now(),
        base_model=BaseModelInfo(
            name_or_path=model_name or getattr(config, "_name_or_path", "") or "unknown",
            revision=model_revision or getattr(config, "_commit_hash", None),
            architecture=type(model).__name__.removeprefix("FSDP"),
            dtype=str(_planning_dtype(model, modules)).removeprefix("torch."),
            fingerprint=weight_fingerprint(modules, {name: d.exact for name, d in digests.items()}),
        ),
        task=settings.task,
        labels=labels,
        target_modules=settings.target_modules,
        settings=settings,
        calibration=CalibrationInfo(
            source=data_source, split=data_split, steps=result.steps, examples=result.examples,
            tokens=result.tokens, token_fingerprint=result.token_fingerprint, mean_loss=result.mean_loss,
            processes=distributed.world(), sharded=sharded.is_sharded(model),
        ),
        modules=[
            ModulePlan(
                name=name, shape=(m.out_features, m.in_features), rank=ranks[name], importance=scores[name],
                share=shares[name], params=ranks[name] * costs[name],
                scaling=lora_scaling(settings.alpha, ranks[name]), weight_sha256=digests[name].exact,
                weight_sha256_rounded=digests[name].rounded,
            )
            for name, m in modules.items()
        ],
        step_size_search=search,
        totals=Totals(budget=budget, allocated=allocated, lora_equivalent=budget, ratio=allocated / budget),
        checksums={k: tensor_sha256(v) for k, v in tensors.items()},
    )


def _search_step_size(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    inits: dict[str, GoraInit],
    ranks: dict[str, int],
    batch_iter: Iterator[dict[str, torch.Tensor]],
    settings: PlanSettings,
) -> StepSizeSearch:
    """``--step-size auto`` on the ``K`` batches that follow the gradient batches."""
    held_out = list(itertools.islice(batch_iter, settings.held_out_steps))
    if len(held_out) < settings.held_out_steps:
        raise GoraError(
            f"--step-size auto needs {settings.held_out_steps} held-out batches after the {settings.steps} "
            f"gradient batches, but the data gave only {len(held_out)}; give more data, lower --steps "
            "or --held-out-steps, or set a number for --step-size"
        )
    per_unit_gamma = {
        name: (init.lora_a, lora_scaling(settings.alpha, ranks[name]) * init.lora_b(1.0)) for name, init in inits.items()
    }
    return search_step_size(model, modules, per_unit_gamma, held_out)


def _check_fixed_ranks(fixed_ranks: Mapping[str, int] | None, modules: dict[str, nn.Linear]) -> None:
    if fixed_ranks is not None and set(fixed_ranks) != set(modules):
        unknown = sorted(set(fixed_ranks) - set(modules)) or sorted(set(modules) - set(fixed_ranks))
        raise GoraError(f"the given ranks cover {len(fixed_ranks)} modules but the target modules of this model are "
                        f"{len(modules)} (first difference: {unknown[0]}): give ranks for exactly the target modules")


def _planning_dtype(model: nn.Module, modules: dict[str, nn.Linear]) -> torch.dtype:
    """The dtype the gradients were computed in."""
    if sharded.is_sharded(model):
        return sharded.compute_dtype(model)
    return next(iter(modules.values())).weight.dtype


def _weight_digests(model: nn.Module, modules: dict[str, nn.Linear]) -> dict[str, WeightDigests]:
    """sha256 of each target weight at the planning dtype and rounded to coarser ones (a sharded weight is
    gathered one module at a time, so it hashes as the same weights loaded whole)."""
    dtype = _planning_dtype(model, modules)
    return {name: weight_digests(sharded.full_weight(m, dtype)) for name, m in modules.items()}


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - started
