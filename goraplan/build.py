"""Stage 1 end to end: accumulated gradients -> importance -> ranks -> initial A/B -> `Plan`.

The maths lives in `importance`, `allocate` and `init`; this module only wires it to a model.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from goraplan.allocate import allocate_ranks, lora_budget
from goraplan.errors import GoraError
from goraplan.gradients import accumulate_gradients
from goraplan.importance import importance, normalise
from goraplan.init import gora_init, lora_scaling
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
from goraplan.step_size import search_step_size
from goraplan.targets import find_target_modules, weight_digest, weight_fingerprint


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
    ``.loss``. The model's weights are not changed.

    ``fixed_ranks`` (module path -> rank, e.g. another plan's ``ranks``) replaces the allocation step: the
    target modules must be exactly its keys, and gradients, importance and the initial adapter still come
    from ``batches``. ``model_revision`` is the Hub commit the model was loaded at, for the manifest.

    >>> plan = build_plan(model, batches, PlanSettings(rank=8, steps=16))  # doctest: +SKIP
    >>> plan.save("plan.gora")                                             # doctest: +SKIP
    """
    settings = (settings or PlanSettings()).resolved()
    r_min, r_max = settings.min_rank, settings.max_rank
    modules = find_target_modules(model, settings.target_modules)
    if fixed_ranks is not None and set(fixed_ranks) != set(modules):
        unknown = sorted(set(fixed_ranks) - set(modules)) or sorted(set(modules) - set(fixed_ranks))
        raise GoraError(f"the given ranks cover {len(fixed_ranks)} modules but the target modules of this model are "
                        f"{len(modules)} (first difference: {unknown[0]}): give ranks for exactly the target modules")
    device = next(model.parameters()).device
    timings: dict[str, float] = {}

    batch_iter = iter(batches)
    t0 = time.perf_counter()
    result = accumulate_gradients(
        model,
        batch_iter,
        modules,
        settings.steps,
        offload=settings.offload_gradients,
        gradient_checkpointing=settings.gradient_checkpointing,
        progress=progress,
    )
    timings["gradients_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = {name: importance(m.weight, result.grads[name], settings.importance) for name, m in modules.items()}
    shares = normalise(scores)
    timings["importance_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    costs = {name: m.out_features + m.in_features for name, m in modules.items()}
    if fixed_ranks is None:
        ranks = allocate_ranks(shares, costs, settings.rank, r_min, r_max, settings.allocation)
    else:
        ranks = {name: int(fixed_ranks[name]) for name in modules}
    timings["allocation_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    unit = {  # B at gamma 1: B is linear in gamma, so every step size is this B scaled
        name: gora_init(result.grads[name], ranks[name], settings.alpha, 1.0, module_generator(settings.seed, name))
        for name in modules
    }
    timings["init_s"] = time.perf_counter() - t0

    search = None
    gamma = settings.step_size
    if gamma == "auto":
        t0 = time.perf_counter()
        held_out = list(itertools.islice(batch_iter, settings.held_out_steps))
        if len(held_out) < settings.held_out_steps:
            raise GoraError(
                f"--step-size auto needs {settings.held_out_steps} held-out batches after the {settings.steps} "
                f"gradient batches, but the data gave only {len(held_out)}; give more data, lower --steps "
                "or --held-out-steps, or set a number for --step-size"
            )
        scaled = {name: (a, b, lora_scaling(settings.alpha, ranks[name])) for name, (a, b) in unit.items()}
        search = search_step_size(model, modules, scaled, held_out)
        gamma = search.chosen
        timings["step_size_search_s"] = time.perf_counter() - t0
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in unit.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, (b * gamma).contiguous()

    digests = {name: weight_digest(m) for name, m in modules.items()}
    budget = lora_budget(costs, settings.rank)
    allocated = sum(ranks[n] * costs[n] for n in modules)
    first_weight = next(iter(modules.values())).weight
    manifest = Manifest(
        created_at=utc_now(),
        base_model=BaseModelInfo(
            name_or_path=model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or "unknown",
            revision=model_revision or getattr(getattr(model, "config", None), "_commit_hash", None),
            architecture=type(model).__name__,
            dtype=str(first_weight.dtype).removeprefix("torch."),
            fingerprint=weight_fingerprint(modules, digests),
        ),
        task=settings.task,
        labels=labels,
        target_modules=settings.target_modules,
        settings=settings,
        calibration=CalibrationInfo(
            source=data_source,
            split=data_split,
            steps=result.steps,
            examples=result.examples,
            tokens=result.tokens,
            token_fingerprint=result.token_fingerprint,
            mean_loss=result.mean_loss,
        ),
        modules=[
            ModulePlan(
                name=name,
                shape=(m.out_features, m.in_features),
                rank=ranks[name],
                importance=scores[name],
                share=shares[name],
                params=ranks[name] * costs[name],
                scaling=lora_scaling(settings.alpha, ranks[name]),
                weight_sha256=digests[name],
            )
            for name, m in modules.items()
        ],
        step_size_search=search,
        totals=Totals(budget=budget, allocated=allocated, lora_equivalent=budget, ratio=allocated / budget),
        checksums={k: tensor_sha256(v) for k, v in tensors.items()},
    )
    plan = Plan(manifest, tensors)
    plan.stats = {**timings, "peak_memory_mb": peak_memory_mb(device)}
    return plan
