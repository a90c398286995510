"""Integration on the real small models and data (slow: loads SmolLM2-135M and MiniLM)."""

import pytest
import torch

import goraplan
from goraplan import data as gdata
from goraplan.models import load_model

pytestmark = pytest.mark.slow


def _loss_with_plan(model, plan, batches):
    modules = dict(model.named_modules())
    saved = {}
    with torch.no_grad():
        for m in plan.manifest.modules:
            w = modules[m.name].weight
            saved[m.name] = w.clone()
            w += m.scaling * plan.lora_b(m.name) @ plan.lora_a(m.name)
        loss = sum(float(model(**b).loss) for b in batches) / len(batches)
        for name, w in saved.items():
            modules[name].weight.copy_(w)
    return loss


@pytest.mark.parametrize("model_name,data,task", [("smollm2-135m", "sarcasm-lm", "causal-lm"),
                                                  ("minilm-l6", "sarcasm", "seq-cls")])
def test_plan_on_real_model_is_a_descent_step_within_budget(model_name, data, task):
    labels = gdata.label_names_of(gdata.load_records(data)) if task == "seq-cls" else None
    model, tok = load_model(model_name, task, num_labels=len(labels) if labels else None, label_names=labels)
    settings = goraplan.PlanSettings(task=task, steps=4, batch_size=4, max_length=64, step_size=0.01)
    ds, _ = gdata.prepare(data, tok, task, max_length=64, limit=16, label_names=labels)
    batches = gdata.make_batches(ds, gdata.PaddingCollator(tok, task), 4, 4)
    plan = goraplan.build_plan(model, batches, settings, model_name=model_name, data_source=data, labels=labels)
    totals = plan.manifest.totals
    assert totals.allocated <= totals.budget
    assert totals.budget - totals.allocated < max(m.shape[0] + m.shape[1] for m in plan.manifest.modules)
    assert len({m.rank for m in plan.manifest.modules}) > 1  # real gradients give unequal ranks
    with torch.no_grad():
        base = sum(float(model(**b).loss) for b in batches) / len(batches)
    assert _loss_with_plan(model, plan, batches) < base
