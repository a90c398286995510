"""gorafit.create_optimizer in the training loops people already have: a plain Trainer, TRL's SFTTrainer and
a hand-written loop. In each, the plan's A and B are the starting point at step 0, and the first AdamW step
moves every lora_B by its group's learning rate: lr x ratio, capped."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import goraplan
from gorafit import GoraTrainer, apply_plan, create_optimizer
from gorafit.optim import LR_B_MAX_DEFAULT
from goraplan.data import collator_for
from goraplan.errors import GoraError
from tests.tiny import make_tokenizer, random_batches, sentences, tiny_llama

LR = 1e-3  # x16 would put B at 1.6e-2: the default cap holds it at 3e-3


@pytest.fixture()
def planned():
    """A tiny Llama with a plan applied, the plan, and its tokenizer."""
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    batches = random_batches(4, vocab=len(tokenizer))
    plan = goraplan.build_plan(model, batches, goraplan.PlanSettings(steps=4, rank=4))
    return apply_plan(model, plan), plan, tokenizer


def lora_weights(model, plan, kind: str) -> dict[str, torch.Tensor]:
    base = model.get_base_model()
    return {m.name: getattr(base.get_submodule(m.name), kind)["default"].weight.detach().clone()
            for m in plan.manifest.modules}


class FirstStep(TrainerCallback):
    """Keeps A and B as they are before the first optimizer step and B right after it."""

    def __init__(self, model, plan):
        self.model, self.plan = model, plan
        self.a0 = self.b0 = self.b1 = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.a0 = lora_weights(self.model, self.plan, "lora_A")
            self.b0 = lora_weights(self.model, self.plan, "lora_B")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.b1 = lora_weights(self.model, self.plan, "lora_B")


def assert_plan_start_and_b_step(plan, a0, b0, b1, b_lr):
    for m in plan.manifest.modules:  # the plan's init reached step 0 untouched
        assert torch.equal(a0[m.name], plan.lora_a(m.name)) and torch.equal(b0[m.name], plan.lora_b(m.name)), m.name
    # Adam's first step moves each weight by lr * g / (|g| + eps): lr wherever the gradient is not tiny
    biggest = max(float((b1[n] - b0[n]).abs().max()) for n in b0)
    assert biggest == pytest.approx(b_lr, rel=1e-2)


def text_dataset(tokenizer, n=32):
    rows = [tokenizer(s) for s in sentences(n)]
    return Dataset.from_list([{**r, "labels": list(r["input_ids"])} for r in rows])


def test_groups_are_the_ones_gorafit_run_uses(planned, tmp_path):
    model, plan, _ = planned
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=LR, weight_decay=5e-4, report_to=[])
    ours = GoraTrainer(model=model, args=args, lr_ratio=16, lr_b_max=LR_B_MAX_DEFAULT).create_optimizer()
    theirs = create_optimizer(model, lr=LR)
    assert type(ours) is type(theirs) is torch.optim.AdamW
    for a, b in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert (a["name"], a["lr"], a["weight_decay"]) == (b["name"], b["lr"], b["weight_decay"])
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
    lrs = {g["name"]: g["lr"] for g in theirs.param_groups}
    assert lrs["lora_A"] == LR and lrs["lora_B"] == pytest.approx(LR_B_MAX_DEFAULT)
    for lr, cap, b_lr in ((1e-4, LR_B_MAX_DEFAULT, 1.6e-3), (LR, None, 1.6e-2), (1e-2, LR_B_MAX_DEFAULT, 1e-2)):
        lrs = {g["name"]: g["lr"] for g in create_optimizer(model, lr=lr, lr_b_max=cap).param_groups}
        assert lrs["lora_A"] == lr and lrs["lora_B"] == pytest.approx(b_lr)  # never below lr


def test_bad_arguments_are_one_sentence(planned):
    model, _, _ = planned
    with pytest.raises(GoraError, match="learning rate must be above 0"):
        create_optimizer(model, lr=0)
    with pytest.raises(GoraError, match="optimizer 'no_such_optimizer' cannot be used"):
        create_optimizer(model, lr=LR, optim="no_such_optimizer")


def test_plain_trainer(planned, tmp_path):
    model, plan, tokenizer = planned
    seen = FirstStep(model, plan)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=LR, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=text_dataset(tokenizer),
                      data_collator=collator_for(tokenizer, "causal-lm"), callbacks=[seen],
                      optimizers=(create_optimizer(model, lr=LR), None))
    trainer.train()
    assert_plan_start_and_b_step(plan, seen.a0, seen.b0, seen.b1, LR_B_MAX_DEFAULT)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install trl)")
def test_trl_sft_trainer(planned, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model, plan, tokenizer = planned
    seen = FirstStep(model, plan)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=LR,
                       lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
                       disable_tqdm=True, max_length=32)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[seen],
                         train_dataset=Dataset.from_list([{"text": s} for s in sentences(32)]),
                         optimizers=(create_optimizer(model, lr=LR), None))
    trainer.train()
    assert trainer.model is model  # TRL kept the planned adapter (no second PEFT wrap)
    assert_plan_start_and_b_step(plan, seen.a0, seen.b0, seen.b1, LR_B_MAX_DEFAULT)


def test_hand_written_loop(planned):
    model, plan, tokenizer = planned
    optimizer = create_optimizer(model, lr=1e-4)  # below the cap: B at 16 x 1e-4
    a0, b0 = lora_weights(model, plan, "lora_A"), lora_weights(model, plan, "lora_B")
    batch = random_batches(1, vocab=len(tokenizer))[0]
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    assert_plan_start_and_b_step(plan, a0, b0, lora_weights(model, plan, "lora_B"), 1.6e-3)


def test_building_the_optimizer_leaves_the_trainers_accelerate_state_alone(planned, tmp_path):
    from accelerate.state import AcceleratorState

    model, _, tokenizer = planned
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=text_dataset(tokenizer))  # sets accelerate's state up
    assert AcceleratorState._shared_state != {}
    create_optimizer(model, lr=LR, optim="adamw_torch_fused")
    assert AcceleratorState._shared_state != {}  # a Trainer made before the optimizer still has its set-up
