"""build_plan end to end on tiny models: descent, determinism, budget, API contract."""

import copy

import pytest
import torch

import goraplan
from tests.tiny import random_batches, tiny_bert_cls, tiny_llama


def _mean_loss(model, batches):
    with torch.no_grad():
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def _with_adapter_written_in(model, plan):
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    for m in plan.manifest.modules:
        with torch.no_grad():
            modules[m.name].weight += m.scaling * plan.lora_b(m.name) @ plan.lora_a(m.name)
    return merged


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_bert_cls])
def test_initial_adapter_is_a_descent_step(make_model):
    model = make_model().eval()
    batches = random_batches(6)
    if make_model is tiny_bert_cls:
        for b in batches:
            b["labels"] = b["input_ids"][:, 0] % 2
    task = "seq-cls" if make_model is tiny_bert_cls else "causal-lm"
    plan = goraplan.build_plan(model, batches, goraplan.PlanSettings(task=task, steps=6, rank=4, step_size=0.02))
    base = _mean_loss(model, batches)
    assert plan.manifest.calibration.mean_loss == pytest.approx(base, rel=1e-5)
    after = _mean_loss(_with_adapter_written_in(model, plan), batches)
    assert after < base
    # and the opposite sign (the reference code's late bug) goes uphill
    flipped = copy.copy(plan)
    flipped.tensors = {k: (-v if k.endswith("lora_B") else v) for k, v in plan.tensors.items()}
    assert _mean_loss(_with_adapter_written_in(model, flipped), batches) > base


def test_same_inputs_give_identical_plans_creation_time_aside():
    settings = goraplan.PlanSettings(steps=4, rank=4, seed=7)
    a = goraplan.build_plan(tiny_llama(), random_batches(4), settings)
    b = goraplan.build_plan(tiny_llama(), random_batches(4), settings)
    assert a.manifest.model_copy(update={"created_at": ""}) == b.manifest.model_copy(update={"created_at": ""})
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    c = goraplan.build_plan(tiny_llama(), random_batches(4), settings.model_copy(update={"seed": 8}))
    assert not torch.equal(a.tensors[next(iter(a.tensors))], c.tensors[next(iter(c.tensors))])


def test_plan_records_budget_ranks_and_settings():
    plan = goraplan.build_plan(tiny_llama(), iter(random_batches(3)), goraplan.PlanSettings(steps=3, rank=4))
    man = plan.manifest
    costs = {m.name: m.shape[0] + m.shape[1] for m in man.modules}
    assert man.totals.budget == 4 * sum(costs.values()) == man.totals.lora_equivalent
    assert man.totals.allocated == sum(m.rank * costs[m.name] for m in man.modules) <= man.totals.budget
    assert man.totals.budget - man.totals.allocated < max(costs.values())
    assert all(2 <= m.rank <= 8 for m in man.modules)
    assert man.settings.min_rank == 2 and man.settings.max_rank == 8  # the defaults: r0 / 2 and 2 r0
    assert man.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert sum(m.share for m in man.modules) == pytest.approx(1.0)
    assert {"gradients_s", "importance_s", "allocation_s", "init_s", "peak_memory_mb"} <= plan.stats.keys()


def test_model_weights_are_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    goraplan.build_plan(model, random_batches(2), goraplan.PlanSettings(steps=2, rank=4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
