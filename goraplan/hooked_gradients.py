"""Weight gradients of layers whose weight cannot carry a gradient (a 4-bit or 8-bit base: QLoRA).

GoRA's gradient ``G_i`` (docs/method.md §1) is the gradient of a weight that, in QLoRA, is stored
packed in integers (bitsandbytes' ``Linear4bit``) and cannot require grad. A layer computing
``y = x W^T (+ b)`` has ``dL/dW = sum over tokens of (dL/dy)^T x``, whatever stores ``W``; so a
forward hook keeps each call's input ``x`` and hooks that call's output, whose gradient ``dL/dy``
arrives during the backward. Pairing input and output gradient per call (not per module) keeps the sum
right when a module runs several times in one forward and under gradient checkpointing (the
recomputed forward's outputs get no gradient, so they add nothing).

A layer's input must be part of the autograd graph for its output to get a gradient; with every weight
frozen nothing upstream requires grad, so an input that does not is replaced by a copy that does
(a leaf: nothing upstream needed its gradient anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

__all__ = ["HookedGradients", "dense_weight", "frozen_modules"]


def frozen_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules whose weight cannot require grad (not a floating-point tensor, e.g. packed 4-bit).

    >>> layer = nn.Linear(2, 2)
    >>> frozen_modules({"a": layer})
    {}
    """
    return {name: m for name, m in modules.items() if not m.weight.is_floating_point()}


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``W`` [out, in] of `module` as a floating-point tensor: dequantized for bitsandbytes'
    4-bit and 8-bit layers, the weight itself otherwise.

    >>> dense_weight(nn.Linear(3, 2)).shape
    torch.Size([2, 3])
    """
    weight = module.weight
    if weight.is_floating_point():
        return weight.detach()
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).reshape(module.out_features, module.in_features)
    scale = getattr(weight, "SCB", None)
    if scale is None:
        scale = getattr(getattr(module, "state", None), "SCB", None)
    if scale is not None:  # bitsandbytes Int8Params: row-wise absmax scale / 127
        return weight.data.float() * (scale.float().unsqueeze(1) / 127)
    dequantize = getattr(module, "dequantized_weight", None)
    if callable(dequantize):
        return dequantize()
    raise TypeError(f"cannot read a floating-point weight from {type(module).__name__} (weight dtype {weight.dtype})")


class HookedGradients:
    """float32 sums ``sum over backward passes of dL/dW`` of each module in `modules`, taken from hooks
    while `capture` is active; ``sums[name]`` has the weight's shape [out, in].

    >>> layer = nn.Linear(3, 2).requires_grad_(False)
    >>> hooked = HookedGradients({"layer": layer})
    >>> with hooked.capture():
    ...     layer(torch.ones(4, 3)).sum().backward()
    >>> hooked.sums["layer"]
    tensor([[4., 4., 4.],
            [4., 4., 4.]])
    """

    def __init__(self, modules: dict[str, nn.Module], device: torch.device | str = "cpu"):
        self.modules = modules
        self.device = torch.device(device)
        self.sums = {
            name: torch.zeros((m.out_features, m.in_features), dtype=torch.float32, device=self.device)
            for name, m in modules.items()
        }
        self.problem: str | None = None

    @contextmanager
    def capture(self):
        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(_input_in_graph))
                handles.append(module.register_forward_hook(partial(self._on_forward, name)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def take_problem(self) -> str | None:
        """What went wrong since the last call (a non-finite gradient), or None; raising inside a
        backward hook would leave other processes waiting in theirs."""
        problem, self.problem = self.problem, None
        return problem

    def _on_forward(self, name: str, module: nn.Module, args: tuple, output) -> None:
        if not (torch.is_tensor(output) and output.requires_grad and args and torch.is_tensor(args[0])):
            return
        x = args[0].detach()
        output.register_hook(partial(self._add, name, x))

    def _add(self, name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        g = grad_out.detach().reshape(-1, grad_out.shape[-1]).to(torch.float32)
        inputs = x.reshape(-1, x.shape[-1]).to(g.device, torch.float32)
        contribution = g.T @ inputs
        if self.problem is None and not torch.isfinite(contribution).all():
            self.problem = (f"the gradient of {name} is not finite (inf or nan); check the calibration data for "
                            "broken examples")
        self.sums[name].add_(contribution.to(self.device))


def _input_in_graph(module: nn.Module, args: tuple):
    """Make the layer's input require grad when nothing upstream does (all weights frozen)."""
    if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and not args[0].requires_grad \
            and torch.is_grad_enabled():
        return (args[0].detach().requires_grad_(True), *args[1:])
    return None
