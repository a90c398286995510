"""Allocation (eq. 10): budget, bounds and monotonicity, for both modes, over many random layers."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goraplan.allocate import allocate_ranks, lora_budget

SHAPES = [(576, 576), (192, 576), (576, 1536), (1536, 576), (384, 384)]


@st.composite
def layer_sets(draw):
    n = draw(st.integers(1, 40))
    raw = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n))
    raw = [x**3 if x > 1e-3 else 0.0 for x in raw]  # skewed importances, as real layers have (or none)
    if sum(raw) == 0:
        raw = [1.0] * n
    total = sum(raw)
    shares = {f"m{i}": x / total for i, x in enumerate(raw)}
    costs = {f"m{i}": sum(draw(st.sampled_from(SHAPES))) for i in range(n)}
    r0 = draw(st.sampled_from([2, 4, 8, 16]))
    r_min = draw(st.integers(1, r0))
    r_max = draw(st.integers(r0, 8 * r0))
    return shares, costs, r0, r_min, r_max


@settings(max_examples=300, deadline=None)
@given(layer_sets())
def test_exact_mode_fills_budget_without_exceeding_it(case):
    shares, costs, r0, r_min, r_max = case
    ranks = allocate_ranks(shares, costs, r0, r_min, r_max, "exact")
    budget = lora_budget(costs, r0)
    used = sum(ranks[n] * costs[n] for n in ranks)
    assert used <= budget
    assert all(r_min <= r <= r_max for r in ranks.values())
    if any(shares[n] > 0 and ranks[n] < r_max for n in ranks):
        # some important module could still grow, so the budget was filled to within one module's cost
        assert budget - used < max(costs.values())
    else:  # every module with importance is at r_max: what is left has nowhere to go by eq. 10
        assert all(ranks[n] == r_min or ranks[n] == r_max for n in ranks if shares[n] == 0)


@settings(max_examples=300, deadline=None)
@given(layer_sets())
def test_ranks_are_monotone_in_share_per_cost(case):
    shares, costs, r0, r_min, r_max = case
    for mode in ("exact", "paper"):
        ranks = allocate_ranks(shares, costs, r0, r_min, r_max, mode)
        names = sorted(ranks, key=lambda n: shares[n] / costs[n])
        for lo, hi in zip(names, names[1:]):
            strictly_less = shares[lo] / costs[lo] < shares[hi] / costs[hi]
            if strictly_less and (costs[lo] == costs[hi] or mode == "paper"):
                assert ranks[lo] <= ranks[hi], (mode, lo, hi)
            else:  # ties, and largest-remainder rounding favouring a cheaper module, move one unit at most
                assert ranks[lo] <= ranks[hi] + 1, (mode, lo, hi)


@settings(max_examples=200, deadline=None)
@given(layer_sets())
def test_paper_mode_is_eq_10_as_written(case):
    shares, costs, r0, r_min, r_max = case
    ranks = allocate_ranks(shares, costs, r0, r_min, r_max, "paper")
    budget = lora_budget(costs, r0)
    for n in ranks:
        assert ranks[n] == min(max(math.floor(budget * shares[n] / costs[n] + 0.5), r_min), r_max)


def test_equal_importance_gives_plain_lora_ranks():
    costs = {f"m{i}": 1152 for i in range(8)}
    shares = {n: 1 / 8 for n in costs}
    for mode in ("exact", "paper"):
        assert set(allocate_ranks(shares, costs, 8, 4, 32, mode).values()) == {8}


def test_exact_mode_redistributes_what_clipping_frees():
    # one dominant layer would take everything; clipped at r_max, the rest is shared by the others
    shares = {"big": 0.97, "a": 0.02, "b": 0.01}
    costs = {"big": 100, "a": 100, "b": 100}
    ranks = allocate_ranks(shares, costs, 8, 1, 16, "exact")
    assert ranks["big"] == 16
    assert sum(r * 100 for r in ranks.values()) == 2400
    assert ranks["a"] >= ranks["b"]
    paper = allocate_ranks(shares, costs, 8, 1, 16, "paper")
    assert sum(r * 100 for r in paper.values()) < 2400  # the paper's rule leaves budget unused here


def test_bad_bounds_are_errors():
    with pytest.raises(ValueError, match="min rank 8 is larger than max rank 4"):
        allocate_ranks({"a": 1.0}, {"a": 10}, 4, 8, 4)
    with pytest.raises(ValueError, match="at least 1"):
        allocate_ranks({"a": 1.0}, {"a": 10}, 0, 1, 4)
