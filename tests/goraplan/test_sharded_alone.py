"""The process-group helpers and the sharding entry points in one process, without torchrun."""

import pytest
import torch

from goraplan import distributed
from goraplan.errors import GoraError
from goraplan.sharded import gather_rows, is_sharded, local, shard_model
from tests.tiny import tiny_llama


def test_one_process_is_rank_0_of_1_and_decides_alone():
    assert (distributed.world(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.from_main(lambda: {"q": 4}) == {"q": 4}
    assert distributed.sum_over_ranks([1.5, 2.0]) == [1.5, 2.0]
    distributed.raise_if_any(None)
    with pytest.raises(GoraError, match="^the loss is not finite$"):
        distributed.raise_if_any("the loss is not finite")


def test_an_unsharded_model_passes_through_unchanged():
    model = tiny_llama()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert not is_sharded(model) and local(weight) is weight
    rows = torch.randn(5, 3)
    assert gather_rows(rows, 5) is rows


def test_sharding_without_a_process_group_says_how_to_launch():
    with pytest.raises(GoraError, match="torchrun --nproc_per_node N"):
        shard_model(tiny_llama())
