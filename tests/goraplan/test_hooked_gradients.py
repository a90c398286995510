"""G from forward/backward hooks equals autograd's G, for weights that cannot require grad (QLoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from goraplan.build import build_plan
from goraplan.gradients import accumulate_gradients
from goraplan.hooked_gradients import HookedGradients, dense_weight, frozen_modules
from goraplan.settings import PlanSettings
from goraplan.targets import find_target_modules
from tests.tiny import random_batches, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


class Int8Linear(nn.Linear):
    """A linear layer whose weight is stored as int8 with one scale per row, as 8-bit bases store it:
    its weight is no floating-point tensor, so it cannot require grad."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = linear.bias

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def quantized_pair():
    """A tiny Llama with int8 target layers, and the float model holding the same (dequantized) weights."""
    quantized = tiny_llama()
    for name, module in find_target_modules(quantized, TARGETS).items():
        parent, child = name.rsplit(".", 1)
        setattr(quantized.get_submodule(parent), child, Int8Linear(module))
    reference = copy.deepcopy(quantized)
    for name, module in find_target_modules(quantized, TARGETS).items():
        parent, child = name.rsplit(".", 1)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight.data.copy_(module.dequantized_weight())
        setattr(reference.get_submodule(parent), child, dense)
    return quantized, reference


def test_hook_g_of_a_float_layer_equals_autograd():
    model = tiny_llama().eval()
    modules = find_target_modules(model, TARGETS)
    batch = random_batches(1, batch_size=3, length=10)[0]
    for m in modules.values():
        m.weight.requires_grad_(True)
    model(**batch).loss.backward()
    autograd = {name: m.weight.grad.clone() for name, m in modules.items()}
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    hooked = HookedGradients(modules)
    with hooked.capture():
        model(**batch).loss.backward()
    for name in modules:
        torch.testing.assert_close(hooked.sums[name], autograd[name], rtol=1e-5, atol=1e-7)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_accumulate_gradients_of_an_int8_base_equals_autograd_on_its_float_copy(checkpointing):
    quantized, reference = quantized_pair()
    batches = random_batches(3, batch_size=2, length=12)
    q_modules = find_target_modules(quantized, TARGETS)
    assert set(frozen_modules(q_modules)) == set(q_modules)
    hooked = accumulate_gradients(quantized, batches, q_modules, 3, gradient_checkpointing=checkpointing)
    autograd = accumulate_gradients(reference, batches, find_target_modules(reference, TARGETS), 3)
    assert hooked.mean_loss == pytest.approx(autograd.mean_loss, rel=1e-6)
    for name, g in autograd.grads.items():
        torch.testing.assert_close(hooked.grads[name], g, rtol=1e-5, atol=1e-7)
    # the layers are left as found: no hooks, nothing newly requiring grad
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in q_modules.values())
    assert all(not p.requires_grad or p.dtype.is_floating_point for p in quantized.parameters())


def test_a_plan_on_an_int8_base_equals_the_plan_on_its_float_copy():
    quantized, reference = quantized_pair()
    settings = PlanSettings(rank=4, steps=2, target_modules=TARGETS)
    q_plan = build_plan(quantized, random_batches(2), settings)
    f_plan = build_plan(reference, random_batches(2), settings)
    assert [m.rank for m in q_plan.manifest.modules] == [m.rank for m in f_plan.manifest.modules]
    for q, f in zip(q_plan.manifest.modules, f_plan.manifest.modules, strict=True):
        assert q.importance == pytest.approx(f.importance, rel=1e-5)
    for key, tensor in f_plan.tensors.items():
        torch.testing.assert_close(q_plan.tensors[key], tensor, rtol=1e-4, atol=1e-6)


def test_dense_weight_of_bitsandbytes_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    layer = bnb.nn.Linear4bit(32, 16, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == torch.uint8 and frozen_modules({"l": layer}) == {"l": layer}
    dense = dense_weight(layer)
    assert dense.shape == (16, 32) and (dense - w).abs().max() < 0.5 * w.abs().max()
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ dense.T, rtol=1e-4, atol=1e-4)
    hooked = HookedGradients({"l": layer})
    with hooked.capture():
        layer(x).pow(2).sum().backward()
    expected = (2 * (x @ dense.T)).T @ x
    torch.testing.assert_close(hooked.sums["l"], expected, rtol=1e-4, atol=1e-4)
