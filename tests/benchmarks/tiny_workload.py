"""A config-built 2-layer BERT on word sequences labelled by whether 'yes' occurs: the quality
benchmark's plumbing on a model that trains in milliseconds (tests only)."""

from __future__ import annotations

import random

import torch

from benchmarks.quality.harness import Workload
from benchmarks.quality.workloads import classification_scorer
from goraplan.data import PaddingCollator
from goraplan.targets import find_target_modules
from tests.tiny import WORDS, make_tokenizer, tiny_bert_cls


def build_tiny(train_examples: int = 64, test_examples: int = 32) -> Workload:
    tok = make_tokenizer()

    def load(seed: int):
        with torch.random.fork_rng(devices=[]):
            model = tiny_bert_cls(vocab_size=len(tok))
            torch.manual_seed(seed)
            model.classifier.reset_parameters()
        return model.eval(), tok

    rng = random.Random(0)

    def row():
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        enc = tok(" ".join(words))
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": int("yes" in words)}

    train = [row() for _ in range(train_examples)]
    test = [row() for _ in range(test_examples)]
    collate = PaddingCollator(tok, "seq-cls")
    model, _ = load(0)
    return Workload(name="nlu", task="seq-cls", load_model=load, train_rows=train,
                    evaluate=classification_scorer(test, collate, 16), collate=collate,
                    targets=list(find_target_modules(model, "all-linear")), batch_size=8, calib_batch_size=4,
                    description=f"tiny-bert train={train_examples}",
                    extra={"model": "tiny BERT (config)", "data": "words", "score": "accuracy"})
