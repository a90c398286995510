"""`gorafit export PLAN.gora --format peft`: the untrained starting adapter, for tools that take an adapter
path, loads in PEFT exactly as `gorafit.apply_plan` wraps the model."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

import goraplan
from gorafit.apply import apply_plan, lora_config_for
from gorafit.cli import cli
from goraplan.models import load_model
from tests.cli_runner import run_command
from tests.gorafit.test_train import LABELS, make_run_inputs


def run(args, capsys):
    return run_command(cli, args, capsys)


def lora_tensors(peft_model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "modules_to_save" in k}


def assert_same_start(loaded, applied, batch) -> None:
    """Every adapter tensor, every scaling and the logits are exactly equal."""
    a, b = lora_tensors(loaded), lora_tensors(applied)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name, module in applied.get_base_model().named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict):
            assert loaded.get_base_model().get_submodule(name).scaling == module.scaling
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
           [n for n, p in applied.named_parameters() if p.requires_grad]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, applied.eval()(**batch).logits)


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_start_adapter_loads_exactly_as_apply_plan(task, tmp_path, capsys):
    inputs = make_run_inputs(tmp_path / "in", task, n=32)
    labels = LABELS if task == "seq-cls" else None
    code, out, err = run(["export", inputs["plan"], "--format", "peft", "-o", tmp_path / "start"], capsys)
    assert code == 0, err
    assert "untrained starting adapter" in out and "is_trainable=True" in out
    plan = goraplan.load_plan(inputs["plan"])
    base, tok = load_model(str(inputs["model"]), task, label_names=labels, seed=plan.manifest.settings.seed)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "start"), is_trainable=True)
    other, _ = load_model(str(inputs["model"]), task, label_names=labels, seed=plan.manifest.settings.seed)
    applied = apply_plan(other, plan)
    batch = tok(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    assert_same_start(loaded, applied, dict(batch))


def test_config_only_route_warns_that_it_drops_the_init(tmp_path):
    inputs = make_run_inputs(tmp_path / "in", "causal-lm", n=32)
    plan = goraplan.load_plan(inputs["plan"])
    with pytest.warns(UserWarning, match="drops its initial A and B .*gorafit export PLAN.gora --format peft"):
        config = lora_config_for(plan)
    assert config.rank_pattern == plan.rank_pattern
    model, _ = load_model(str(inputs["model"]), "causal-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        apply_plan(model, plan)  # the init-keeping route does not warn


def test_a_plan_exports_only_as_a_peft_start(tmp_path, capsys):
    inputs = make_run_inputs(tmp_path / "in", "causal-lm", n=32)
    for extra, message in ((["--format", "merged"], "--format merged needs a trained adapter"),
                           (["--max-rank", 2], "--max-rank needs a trained adapter")):
        code, _, err = run(["export", inputs["plan"], *extra, "-o", tmp_path / "x"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    code, _, err = run(["export", inputs["plan"], "-o", tmp_path / "in"], capsys)  # the folder holding the plan
    assert code == 2 and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_start_adapter_loads_exactly(tmp_path, capsys):
    from goraplan.build import build_plan
    from goraplan.data import collator_for, make_batches, prepare

    model, tok = load_model("smollm2-135m")
    ds, _ = prepare("sarcasm-lm", tok, "causal-lm", max_length=32, limit=2)
    plan = build_plan(model, make_batches(ds, collator_for(tok, "causal-lm"), 1, 2),
                      goraplan.PlanSettings(steps=2, batch_size=1, max_length=32), model_name="smollm2-135m")
    plan.save(tmp_path / "plan.gora")
    code, _, err = run(["export", tmp_path / "plan.gora", "-o", tmp_path / "start"], capsys)
    assert code == 0, err
    loaded = PeftModel.from_pretrained(model, str(tmp_path / "start"), is_trainable=True)
    other, _ = load_model("smollm2-135m")
    batch = dict(tok(["Is this headline sarcastic?"], return_tensors="pt"))
    assert_same_start(loaded, apply_plan(other, plan), batch)
