"""apply_plan: the PEFT model at step 0 is the base model with each planned s_i * B_i @ A_i written in."""

import copy
import math

import pytest
import torch

import goraplan
from gorafit import apply_plan
from goraplan.match import ModelMismatchError
from tests.tiny import random_batches, tiny_bert_cls, tiny_llama


def _plan_for(model, task="causal-lm", **settings):
    batches = random_batches(4)
    if task == "seq-cls":
        for b in batches:
            b["labels"] = b["input_ids"][:, 0] % 2
    return goraplan.build_plan(model, batches, goraplan.PlanSettings(task=task, steps=4, rank=4, **settings))


def _written_in(model, plan):
    """The base model with W + s_i * B_i @ A_i computed by hand for every planned module."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for m in plan.manifest.modules:
            weight = merged.get_submodule(m.name).weight
            scaling = plan.manifest.settings.alpha / math.sqrt(m.rank)  # rsLoRA: alpha / sqrt(r_i)
            weight += scaling * plan.lora_b(m.name) @ plan.lora_a(m.name)
    return merged


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_step_zero_output_equals_weights_written_in_by_hand(task):
    model = (tiny_llama() if task == "causal-lm" else tiny_bert_cls()).eval()
    plan = _plan_for(model, task)
    assert len(set(plan.ranks.values())) > 1  # heterogeneous ranks, or the test proves little
    expected_model = _written_in(model, plan)
    batch = random_batches(1, seed=5)[0]
    with torch.no_grad():
        expected = expected_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        peft_model = apply_plan(model, plan).eval()
        got = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the adapter really moved the output: the base model alone differs
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (base - expected).abs().max() > 1e-4


def test_base_weights_untouched_and_only_the_adapter_trains():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan_for(model)
    peft_model = apply_plan(model, plan)
    base = peft_model.get_base_model()
    for name, value in before.items():
        key = name.replace(".weight", ".base_layer.weight") if name.rsplit(".", 1)[0] in plan.ranks else name
        assert torch.equal(base.state_dict()[key], value), name
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad) == plan.manifest.totals.allocated


def test_config_speaks_peft_and_copies_the_plan_tensors():
    model = tiny_llama()
    plan = _plan_for(model)
    peft_model = apply_plan(model, plan)
    config = peft_model.peft_config["default"]
    settings = plan.manifest.settings
    assert (config.r, config.lora_alpha, config.use_rslora) == (settings.rank, settings.alpha, True)
    assert config.rank_pattern == plan.rank_pattern
    assert config.target_modules == [m.name for m in plan.manifest.modules]
    assert config.init_lora_weights is True and config.lora_dropout == 0 and config.bias == "none"
    assert config.task_type == "CAUSAL_LM" and not config.modules_to_save
    for m in plan.manifest.modules:
        layer = peft_model.get_base_model().get_submodule(m.name)
        assert torch.equal(layer.lora_A["default"].weight, plan.lora_a(m.name))
        assert torch.equal(layer.lora_B["default"].weight, plan.lora_b(m.name))
        assert layer.scaling["default"] == pytest.approx(m.scaling)


def test_seq_cls_trains_and_saves_the_head():
    model = tiny_bert_cls()
    plan = _plan_for(model, "seq-cls")
    peft_model = apply_plan(model, plan)
    config = peft_model.peft_config["default"]
    assert config.task_type == "SEQ_CLS" and "classifier" in config.modules_to_save
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)
    assert not any("classifier" in m.name for m in plan.manifest.modules)


def test_plan_for_another_model_is_refused_and_the_fingerprint_check_can_be_skipped():
    model = tiny_llama()
    plan = _plan_for(model)
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    with pytest.raises(ModelMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        apply_plan(other, plan)
    apply_plan(other, plan, check_fingerprint=False)  # same shapes: allowed when asked
    with pytest.raises(ModelMismatchError, match="no linear layer"):
        apply_plan(tiny_llama(layers=1), plan, check_fingerprint=False)


def test_caller_random_state_is_left_alone():
    model = tiny_llama()
    plan = _plan_for(model)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    apply_plan(model, plan)
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_model_keeps_the_plan_exact():
    model = tiny_llama()
    plan = _plan_for(model)  # planned in float32; the same weights in bf16 lose bits, so skip the fingerprint
    peft_model = apply_plan(model.to(torch.bfloat16), plan, check_fingerprint=False)
    for m in plan.manifest.modules:
        layer = peft_model.get_base_model().get_submodule(m.name)
        assert layer.base_layer.weight.dtype == torch.bfloat16
        # PEFT keeps the adapter of a half-precision model in float32 (autocast_adapter_dtype): the plan's
        # tensors go in as they are, in that dtype
        weight = layer.lora_B["default"].weight
        assert torch.equal(weight, plan.lora_b(m.name).to(weight.dtype))
