"""--step-size auto: the search measures what training will start from, finds a known optimum, and
records its choice; the plan equals a fixed-gamma plan at the chosen gamma."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from goraplan import PlanSettings, build_plan, load_plan
from goraplan.errors import GoraError
from goraplan.step_size import STEP_SIZE_CANDIDATES, adapters_added, choose_step_size, mean_loss
from goraplan.targets import find_target_modules
from tests.tiny import random_batches, tiny_llama


class Regression(nn.Module):
    """``y = W x`` with mean squared error: one gradient step of size gamma has a known best gamma."""

    def __init__(self, n: int):
        super().__init__()
        self.proj = nn.Linear(n, n, bias=False)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.proj(x) - y) ** 2).sum(-1).mean())


def regression_batches(n: int, c: float, count: int, seed: int = 0):
    """Batches whose inputs have second moment ``E[x x^T] = c I``, targets from a fixed ``W*``."""
    w_star = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    x = (c * n) ** 0.5 * torch.eye(n)  # mean of x x^T over the n rows = c I
    return [{"x": x, "y": x @ w_star.T} for _ in range(count)]


def test_choose_step_size_rule():
    assert choose_step_size(1.0, {0.01: 0.9, 0.05: 0.8, 0.1: 0.85}) == 0.05
    assert choose_step_size(1.0, {0.01: 0.9, 0.05: 0.9}) == 0.01  # ties: the smaller step
    assert choose_step_size(0.5, {0.01: 0.6, 0.1: 0.7}) == 0.01  # nothing beats the base: the smallest


def test_auto_finds_the_known_best_step_on_a_quadratic():
    # L(W0 - gamma G) = c (1 - 2 c gamma)^2 ||W0 - W*||^2: best gamma = 1 / (2c) = 0.1 for c = 5.
    # With full rank (r = n) GoRA's adapter is exactly -gamma G, so the search must pick 0.1.
    n = 4
    model = Regression(n)
    torch.nn.init.zeros_(model.proj.weight)
    settings = PlanSettings(target_modules=["proj"], rank=n, min_rank=n, max_rank=n, steps=2, step_size="auto",
                            held_out_steps=2)
    plan = build_plan(model, regression_batches(n, 5.0, 4), settings)
    search = plan.manifest.step_size_search
    assert search.chosen == 0.1 and plan.manifest.step_size == 0.1
    assert search.losses["0.1"] == pytest.approx(0.0, abs=1e-8)
    assert search.base_loss > search.losses["0.05"] > search.losses["0.1"]
    assert set(search.losses) == {f"{g:g}" for g in STEP_SIZE_CANDIDATES}
    # and the adapter really is the step -gamma G (W0 = 0, so W0 - 0.1 G = W*)
    s = plan.manifest.modules[0].scaling
    delta = s * plan.tensors["proj.lora_B"] @ plan.tensors["proj.lora_A"]
    w_star = regression_batches(n, 5.0, 1)[0]["y"].T @ torch.linalg.inv(regression_batches(n, 5.0, 1)[0]["x"].T)
    torch.testing.assert_close(delta, w_star, atol=1e-4, rtol=1e-4)


def test_the_search_measures_the_model_training_starts_from():
    """The hooks' loss at the chosen gamma equals the loss of the PEFT model gorafit builds from the plan."""
    from gorafit import apply_plan

    batches = random_batches(6, seed=3)
    model = tiny_llama()
    plan = build_plan(model, batches, PlanSettings(rank=4, steps=4, step_size="auto", held_out_steps=2))
    chosen = plan.manifest.step_size_search.chosen
    held_out = batches[4:]
    peft_model = apply_plan(tiny_llama(), plan)
    peft_model.eval()
    assert mean_loss(peft_model, held_out) == pytest.approx(plan.manifest.step_size_search.losses[f"{chosen:g}"],
                                                            rel=1e-5)


def test_auto_plan_equals_the_fixed_plan_at_the_chosen_step_and_leaves_the_model_alone():
    batches = random_batches(7, seed=5)
    model = tiny_llama()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    auto = build_plan(model, batches, PlanSettings(rank=4, steps=4, step_size="auto", held_out_steps=3))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in find_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"]).values())
    search = auto.manifest.step_size_search
    assert search.held_out_batches == 3 and search.chosen in STEP_SIZE_CANDIDATES
    best = min(v for v in search.losses.values() if v is not None)
    assert search.losses[f"{search.chosen:g}"] == best or best >= search.base_loss
    fixed = build_plan(tiny_llama(), batches, PlanSettings(rank=4, steps=4, step_size=search.chosen))
    assert fixed.manifest.calibration.token_fingerprint == auto.manifest.calibration.token_fingerprint  # same N batches
    assert fixed.ranks == auto.ranks
    for name, t in fixed.tensors.items():
        torch.testing.assert_close(auto.tensors[name], t, rtol=1e-6, atol=1e-9)
    assert fixed.manifest.step_size_search is None and fixed.manifest.step_size == search.chosen


def test_auto_hooks_are_removed_even_when_a_forward_fails():
    model = tiny_llama()
    modules = find_target_modules(model, ["q_proj"])
    adapters = {name: (torch.zeros(2, m.in_features), torch.zeros(m.out_features, 2)) for name, m in modules.items()}
    with pytest.raises(RuntimeError), adapters_added(modules, adapters):
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in modules.values())


def test_auto_without_enough_batches_is_one_clear_error():
    with pytest.raises(GoraError, match="needs 4 held-out batches after the 4 gradient batches, but the data gave only 1"):
        build_plan(tiny_llama(), random_batches(5), PlanSettings(rank=4, steps=4, step_size="auto"))


def test_auto_plan_round_trips(tmp_path):
    plan = build_plan(tiny_llama(), random_batches(6), PlanSettings(rank=4, steps=4, step_size="auto", held_out_steps=2))
    plan.save(tmp_path / "p.gora")
    again = load_plan(tmp_path / "p.gora")
    assert again.manifest.step_size_search == plan.manifest.step_size_search
    assert again.manifest.settings.step_size == "auto"


@pytest.mark.parametrize("bad", [0, -0.1, "big"])
def test_step_size_must_be_positive_or_auto(bad):
    with pytest.raises(ValueError):
        PlanSettings(step_size=bad)
