"""Which linear layers a plan adapts, matched the way PEFT matches ``target_modules``."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from goraplan.errors import GoraError

ALL_LINEAR = "all-linear"
# Output layers that "all-linear" leaves out, as PEFT does: the LM head and classification heads.
OUTPUT_LAYER_NAMES = ("lm_head", "classifier", "score", "embed_out", "output")


def parse_target_modules(spec: str | Sequence[str] | None) -> list[str] | str | None:
    """``"q_proj,v_proj"`` -> ``["q_proj", "v_proj"]``; ``"all-linear"`` stays a string.

    >>> parse_target_modules("q_proj, v_proj")
    ['q_proj', 'v_proj']
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.strip() == ALL_LINEAR:
            return ALL_LINEAR
        spec = spec.split(",")
    names = [s.strip() for s in spec if s.strip()]
    return names or None


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, targets: Sequence[str] | str) -> dict[str, nn.Linear]:
    """Full module path -> linear layer, in model order.

    A name in ``targets`` matches a module whose path equals it or ends with ``"." + name`` (PEFT's
    rule); ``"all-linear"`` takes every ``nn.Linear`` except the output layers.
    """
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if targets == ALL_LINEAR:
            if name.split(".")[-1] in OUTPUT_LAYER_NAMES:
                continue
        elif not _matches(name, targets):
            continue
        found[name] = module
    if not found:
        shown = targets if isinstance(targets, str) else ",".join(targets)
        linear_types = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise GoraError(
            f"target modules {shown!r} match no linear layer of this model; "
            f"its linear layers are named {', '.join(linear_types)}"
        )
    return found


def module_type(name: str) -> str:
    """The kind of a module, for summaries: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``.

    >>> module_type("model.layers.3.self_attn.q_proj")
    'self_attn.q_proj'
    """
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1 :]) if digits else parts[-1]


def weight_digest(module: nn.Linear) -> str:
    """sha256 of one weight's float32 bytes.

    Hashing the float32 cast (and not the stored dtype) keeps the digest equal when the same weights are
    loaded in another dtype whose cast is exact (bf16 -> fp32), and different when a cast loses bits.
    """
    return tensor_digest(module.weight)


def tensor_digest(weight: torch.Tensor) -> str:
    """sha256 of a weight's float32 bytes (see ``weight_digest``)."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


def weight_fingerprint(modules: dict[str, nn.Linear], digests: dict[str, str] | None = None) -> str:
    """sha256 over the names, shapes and float32 weight digests of the target modules."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(str(tuple(modules[name].weight.shape)).encode())
        digest.update((digests[name] if digests else weight_digest(modules[name])).encode())
    return "sha256:" + digest.hexdigest()
