import pytest
import torch

from goraplan.errors import GoraError
from goraplan.gradients import accumulate_gradients
from goraplan.targets import find_target_modules
from tests.tiny import random_batches, tiny_bert_cls, tiny_llama


def _reference_mean_grads(model, batches, names):
    """Plain autograd, one batch at a time, summed in float64: the independent answer."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n + ".weight"], dtype=torch.float64) for n in names}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for n in names:
            sums[n] += params[n + ".weight"].grad.double()
    model.zero_grad()
    return {n: s / len(batches) for n, s in sums.items()}


@pytest.mark.parametrize("offload,checkpointing", [(False, False), (True, False), (False, True)])
def test_mean_gradient_matches_plain_autograd_including_the_last_layer(offload, checkpointing):
    model = tiny_llama().eval()
    batches = random_batches(5)
    modules = find_target_modules(model, ["q_proj", "v_proj", "o_proj"])
    result = accumulate_gradients(model, batches, modules, 5, offload=offload, gradient_checkpointing=checkpointing)
    ref = _reference_mean_grads(model, batches, list(modules))
    assert result.steps == 5 and result.examples == 20 and result.tokens == 5 * 4 * 12
    last = list(modules)[-1]  # the reference code's pre-accumulate hook lost this layer's final step
    for name in modules:
        assert result.grads[name].dtype == torch.float32
        torch.testing.assert_close(result.grads[name].double(), ref[name], rtol=1e-4, atol=1e-7)
    assert result.grads[last].abs().sum() > 0


def test_model_is_left_as_it_was_found():
    model = tiny_llama()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = find_target_modules(model, "all-linear")
    accumulate_gradients(model, random_batches(2), modules, 2, gradient_checkpointing=True)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not any(m.weight._post_accumulate_grad_hooks for m in modules.values())
    assert not model.is_gradient_checkpointing


def test_only_targets_collect_gradients_and_lm_head_is_not_a_target():
    model = tiny_llama()
    modules = find_target_modules(model, "all-linear")
    assert not any(n.endswith("lm_head") for n in modules)
    bert = find_target_modules(tiny_bert_cls(), "all-linear")
    assert not any(n.endswith("classifier") for n in bert)
    assert any(n.endswith("attention.self.query") for n in bert)


def test_non_finite_gradient_names_the_module():
    model = tiny_llama()
    modules = find_target_modules(model, ["v_proj"])
    name = next(iter(modules))
    with torch.no_grad():
        modules[name].weight[0, 0] = float("inf")
    with pytest.raises(GoraError, match="not finite"):
        accumulate_gradients(model, random_batches(1), modules, 1)


def test_too_few_batches_is_an_error():
    model = tiny_llama()
    modules = find_target_modules(model, ["q_proj"])
    with pytest.raises(GoraError, match="only 2 batches but 3 gradient steps"):
        accumulate_gradients(model, random_batches(2), modules, 3)


def test_target_modules_matching_nothing_lists_the_real_names():
    with pytest.raises(GoraError, match="match no linear layer.*q_proj"):
        find_target_modules(tiny_llama(), ["query"])
