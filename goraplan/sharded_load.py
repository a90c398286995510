"""Loading a model straight into FSDP2 shards: rank 0 alone reads the checkpoint.

Every rank builds the model on the meta device (no memory), shards it, allocates only its own shards,
and receives its rows from rank 0 (``set_model_state_dict(..., broadcast_from_rank0=True)``). Rank 0
holds the whole checkpoint once, while reading it; no other rank ever does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from goraplan import distributed
from goraplan.models import load_model
from goraplan.sharded import shard_model


def load_sharded_model(name: str, task: str = "causal-lm", *, dtype: str | torch.dtype = "float32",
                       **load_kwargs: Any) -> tuple[nn.Module, Any]:
    """``goraplan.models.load_model`` for a sharded model: same arguments, same model and tokenizer, but
    each rank holds only its shards (float32; forward and backward run in ``dtype``)."""
    whole: list[nn.Module] = []  # rank 0's full model, until its weights are sent

    def read_checkpoint() -> tuple[type, Any, Any, torch.dtype, dict[str, torch.Tensor]]:
        model, tokenizer = load_model(name, task, dtype=dtype, device="cpu", **load_kwargs)
        whole.append(model)
        return type(model), model.config, tokenizer, next(model.parameters()).dtype, _non_persistent_buffers(model)

    model_class, config, tokenizer, compute_dtype, buffers = distributed.from_main(read_checkpoint)
    with torch.device("meta"):
        model = model_class(config)
    shard_model(model, compute_dtype)
    model.to_empty(device=distributed.device())
    full_state = whole[0].state_dict() if whole else {}
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    whole.clear()
    del full_state
    # Buffers outside the state dict (rotary inv_freq) were left uninitialised by to_empty().
    for buffer_name, value in buffers.items():
        model.get_buffer(buffer_name).copy_(value)
    model.eval()
    return model, tokenizer


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    saved = model.state_dict().keys()
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if name not in saved}
