"""Planning a model sharded with FSDP2 over 3 processes (gloo, CPU) gives the plan one process gives.

One torchrun launch runs every case (imports dominate the cost): this file is also the worker script.
Sizes are chosen so that neither the batches nor the rows of any weight divide by the 3 processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import goraplan
from goraplan import PlanSettings, build_plan
from goraplan.errors import GoraError
from goraplan.targets import find_target_modules
from tests.tiny import random_batches, tiny_llama

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
WORLD = 3


def tiny_qwen2():
    """Qwen2-style: q/k/v biases, tied embeddings, 40/20/52 rows (none divisible by 3)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=48, hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def tiny_llama_bf16():
    return tiny_llama().to(torch.bfloat16)


def with_broken_batch(batches):
    """Batch 1 (rank 1's first) has no label to predict: its loss and gradients are not finite."""
    batches[1]["labels"].fill_(-100)
    return batches


class _NanBackward(torch.autograd.Function):
    """Identity forward, non-finite backward: a gradient that breaks on one rank while the loss stays finite."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def break_gradients_here(model):
    """From now on the backward through layer 0's MLP of this process's ``model`` gives nan."""
    model.model.layers[0].mlp.register_forward_hook(lambda _m, _i, out: _NanBackward.apply(out))


# name -> (model, batches, settings). Steps 5 and 7: not divisible by 3.
CASES = {
    "llama_auto": (tiny_llama, lambda: random_batches(7), dict(steps=5, rank=4, step_size="auto", held_out_steps=2)),
    "qwen2_tied_checkpointing": (tiny_qwen2, lambda: random_batches(7), dict(
        steps=7, rank=4, target_modules="all-linear", gradient_checkpointing=True)),
    "llama_bf16": (tiny_llama_bf16, lambda: random_batches(5), dict(steps=5, rank=4)),
}
BROKEN = (tiny_llama, lambda: with_broken_batch(random_batches(4)), dict(steps=4, rank=4))


def _worker(out: Path) -> None:
    from goraplan import distributed
    from goraplan.gradients import accumulate_gradients
    from goraplan.sharded import shard_model

    rank = distributed.init_if_launched()
    for name, (make_model, make_batches, settings) in CASES.items():
        model = make_model()
        shard_model(model, compute_dtype=next(model.parameters()).dtype)
        plan = build_plan(model, make_batches(), PlanSettings(**settings))
        if rank == 0:
            plan.save(out / f"{name}.gora")
    model = shard_model(tiny_qwen2())
    modules = find_target_modules(model, "all-linear")
    result = accumulate_gradients(model, random_batches(4), modules, 4)
    shapes = {name: list(g.shape) for name, g in result.grads.items()}
    (out / f"accumulators.{rank}.json").write_text(json.dumps(shapes))
    make_model, make_batches, settings = BROKEN
    model = shard_model(make_model())
    try:
        build_plan(model, make_batches(), PlanSettings(**settings))
        message = "no error"
    except GoraError as exc:
        message = str(exc)
    (out / f"broken.{rank}.json").write_text(json.dumps(message))
    model = shard_model(tiny_llama())
    if rank == 1:
        break_gradients_here(model)
    try:
        build_plan(model, random_batches(4), PlanSettings(steps=4, rank=4))
        message = "no error"
    except GoraError as exc:
        message = str(exc)
    (out / f"broken_gradient.{rank}.json").write_text(json.dumps(message))
    distributed.finish()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _assert_same_plan(sharded: goraplan.Plan, single: goraplan.Plan) -> None:
    assert sharded.ranks == single.ranks
    for a, b in zip(sharded.manifest.modules, single.manifest.modules):
        assert a.importance == pytest.approx(b.importance, rel=1e-6, abs=0)
        assert a.weight_sha256 == b.weight_sha256
    for key, t in single.tensors.items():
        scale = float(t.abs().max())
        torch.testing.assert_close(sharded.tensors[key], t, rtol=1e-6, atol=1e-6 * scale)
    assert sharded.manifest.base_model == single.manifest.base_model
    assert sharded.manifest.calibration.token_fingerprint == single.manifest.calibration.token_fingerprint
    assert sharded.manifest.calibration.steps == single.manifest.calibration.steps
    assert sharded.manifest.calibration.tokens == single.manifest.calibration.tokens
    assert sharded.manifest.calibration.mean_loss == pytest.approx(single.manifest.calibration.mean_loss, rel=1e-6)
    assert (sharded.manifest.calibration.sharded, sharded.manifest.calibration.processes) == (True, WORLD)
    assert (single.manifest.calibration.sharded, single.manifest.calibration.processes) == (False, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_plan_equals_the_one_process_plan(sharded_run, case):
    make_model, make_batches, settings = CASES[case]
    single = build_plan(make_model(), make_batches(), PlanSettings(**settings))
    sharded = goraplan.load_plan(sharded_run / f"{case}.gora")
    _assert_same_plan(sharded, single)
    if settings.get("step_size") == "auto":
        assert sharded.manifest.step_size_search.chosen == single.manifest.step_size_search.chosen
        for gamma, loss in single.manifest.step_size_search.losses.items():
            assert sharded.manifest.step_size_search.losses[gamma] == pytest.approx(loss, rel=1e-6)


def test_no_rank_holds_a_whole_accumulator(sharded_run):
    """Each rank's accumulators are its rows of each weight (torch.chunk layout), which add up to the whole."""
    per_rank = [json.loads((sharded_run / f"accumulators.{rank}.json").read_text()) for rank in range(WORLD)]
    whole = {name: m.weight.shape for name, m in find_target_modules(tiny_qwen2(), "all-linear").items()}
    for name, (rows, cols) in whole.items():
        local_rows = [shapes[name][0] for shapes in per_rank]
        assert all(shapes[name][1] == cols for shapes in per_rank)
        assert sum(local_rows) == rows and max(local_rows) == -(-rows // WORLD) < rows


@pytest.mark.parametrize("case,says", [("broken", "the loss of calibration batch 1 is not finite"),
                                       ("broken_gradient", "the gradient of model.layers.0.")])
def test_a_non_finite_loss_or_gradient_on_one_rank_stops_every_rank_with_one_sentence(sharded_run, case, says):
    """Only rank 1 meets the problem (its batch, its backward); every rank stops with the same sentence, and the
    launch returned (a hang would have failed the fixture's timeout)."""
    messages = {json.loads((sharded_run / f"{case}.{rank}.json").read_text()) for rank in range(WORLD)}
    assert len(messages) == 1, messages  # the same error everywhere
    message = messages.pop()
    assert message.startswith(says) and "not finite" in message and "\n" not in message


def test_other_importance_metrics_are_refused_on_a_sharded_model():
    from goraplan.sharded import check_importance_metric

    with pytest.raises(GoraError, match="--importance grad-nuclear needs the whole gradient.*sensitivity"):
        check_importance_metric("grad-nuclear")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
