"""Per-layer rank allocation within plain LoRA's parameter budget (GoRA, arXiv 2502.12171, eq. 10).

One unit of rank costs ``f_i = out_i + in_i`` parameters in module ``i``. The budget is what plain
LoRA at rank ``r0`` trains: ``B = r0 * sum_i f_i``. Eq. 10 gives each module its share of the budget:
``r_i = clip(round(B * a_i / f_i), r_min, r_max)``.

Two modes:
- ``paper``: eq. 10 as written (the reference code's rule). Clipping and rounding let the total drift
  away from ``B``.
- ``exact`` (default): after clipping, what clipping freed or consumed is redistributed over the
  unclipped modules in proportion to ``a_i`` (repeated until no new module clips), then the real-valued
  ranks are rounded with largest remainders, so ``sum_i r_i * f_i <= B`` and it is within one module's cost of the budget
  unless every module with importance is already at ``r_max``.

Serving (docs/method.md §7): vLLM pads every adapter to its ``--max-lora-rank``, one of
`SERVING_RANKS`, so a served adapter costs ``R * sum_i f_i`` parameters per adapter slot, whatever its
own ranks; `serving_rank` gives the smallest ``R`` that holds a plan, and capping ``r_max`` at a chosen
``R`` (``goraplan build --serve-rank R``) keeps a plan inside that bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

AllocationMode = Literal["exact", "paper"]
ALLOCATION_MODES: tuple[str, ...] = get_args(AllocationMode)
# vLLM's `--max-lora-rank` accepts exactly these values (vllm/config/lora.py, MaxLoRARanks).
SERVING_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def serving_rank(max_rank: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` that holds an adapter whose largest rank is `max_rank`; None above 512.

    >>> serving_rank(8), serving_rank(9), serving_rank(24), serving_rank(600)
    (8, 16, 32, None)
    """
    return next((allowed for allowed in SERVING_RANKS if max_rank <= allowed), None)


def padded_parameters(costs: Mapping[str, int], rank: int) -> int:
    """Parameters a server that pads every module to `rank` holds for these modules (one adapter slot).

    >>> padded_parameters({"q": 1152, "v": 768}, 32)
    61440
    """
    return rank * sum(costs.values())


def lora_budget(costs: Mapping[str, int], r0: int) -> int:
    """Parameters plain LoRA at rank ``r0`` trains over these modules.

    >>> lora_budget({"q": 1152, "v": 768}, 8)
    15360
    """
    return r0 * sum(costs.values())


def allocate_ranks(
    shares: Mapping[str, float],
    costs: Mapping[str, int],
    r0: int,
    r_min: int,
    r_max: int,
    mode: AllocationMode = "exact",
    caps: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks per module from importance shares ``a_i`` (summing to 1) and per-rank costs ``f_i``.

    ``caps`` (module -> ``min(out, in)``) lowers ``r_min`` and ``r_max`` per module: a rank above the
    matrix's own rank adds parameters but nothing the update could express.

    >>> allocate_ranks({"a": 0.5, "b": 0.5}, {"a": 100, "b": 100}, r0=8, r_min=4, r_max=32)
    {'a': 8, 'b': 8}
    >>> allocate_ranks({"a": 0.9, "b": 0.1}, {"a": 24, "b": 100}, r0=8, r_min=4, r_max=32, caps={"a": 8, "b": 50})
    {'a': 8, 'b': 8}
    """
    _check_bounds(r0, r_min, r_max)
    if set(shares) != set(costs) or (caps is not None and set(caps) != set(costs)):
        raise ValueError("shares, costs and caps must name the same modules")
    if not shares:
        return {}
    r_max_of = {name: min(r_max, caps[name]) if caps else r_max for name in shares}
    r_min_of = {name: min(r_min, r_max_of[name]) for name in shares}
    budget = lora_budget(costs, r0)
    if mode == "paper":
        return {
            name: min(max(_round_half_up(budget * shares[name] / costs[name]), r_min_of[name]), r_max_of[name])
            for name in shares
        }
    if mode != "exact":
        raise ValueError(f"unknown allocation mode {mode!r}; choose one of {', '.join(ALLOCATION_MODES)}")
    targets = _water_fill(shares, costs, budget, r_min_of, r_max_of)
    return _round_within_budget(targets, costs, budget, r_min_of, r_max_of)


def _check_bounds(r0: int, r_min: int, r_max: int) -> None:
    if r0 < 1 or r_min < 1 or r_max < 1:
        raise ValueError(f"ranks must be at least 1 (got rank {r0}, min {r_min}, max {r_max})")
    if r_min > r_max:
        raise ValueError(f"min rank {r_min} is larger than max rank {r_max}")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _water_fill(
    shares: Mapping[str, float], costs: Mapping[str, int], budget: float,
    r_min: Mapping[str, int], r_max: Mapping[str, int],
) -> dict[str, float]:
    """Real-valued ranks ``clip(lam * a_i / f_i, r_min, r_max)`` with ``lam`` set so they spend the budget.

    Eq. 10 is ``lam = B``. Clipping frees or consumes budget; raising or lowering ``lam`` hands that
    to the unclipped modules in proportion to ``a_i``, which is the redistribution GoRA asks for.
    The spent budget is monotone in ``lam``, so bisection finds it.
    """
    names = list(shares)
    if sum(shares.values()) <= 0:  # no gradient signal at all: equal shares
        shares = {name: 1.0 / len(names) for name in names}

    def ranks(lam: float) -> dict[str, float]:
        return {n: min(max(lam * shares[n] / costs[n], r_min[n]), r_max[n]) for n in names}

    def spent(lam: float) -> float:
        return sum(r * costs[n] for n, r in ranks(lam).items())

    def saturated(lam: float) -> bool:  # no module with importance can grow any more
        return all(r >= r_max[n] for n, r in ranks(lam).items() if shares[n] > 0)

    lo, hi = 0.0, float(budget)
    while spent(hi) < budget and not saturated(hi) and hi < 1e300:  # shares below ~1e-300 stay at r_min
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if spent(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return ranks(lo)


def _round_within_budget(
    targets: Mapping[str, float], costs: Mapping[str, int], budget: int,
    r_min: Mapping[str, int], r_max: Mapping[str, int],
) -> dict[str, int]:
    """Largest-remainder rounding that never exceeds the budget.

    Each module gets the floor of its real-valued rank, then the modules with the largest fractional
    parts get one more unit while it fits. A module already at its real-valued rank gets nothing more,
    so budget that no module with importance can absorb (all at ``r_max``) stays unspent rather than
    going to unimportant layers.
    """
    ranks = {name: max(r_min[name], min(r_max[name], math.floor(t + 1e-9))) for name, t in targets.items()}
    left = budget - sum(ranks[name] * costs[name] for name in ranks)
    for name in sorted(ranks, key=lambda n: (-(targets[n] - ranks[n]), costs[n], n)):
        if targets[name] - ranks[name] > 1e-9 and ranks[name] < r_max[name] and costs[name] <= left:
            ranks[name] += 1
            left -= costs[name]
    return ranks
