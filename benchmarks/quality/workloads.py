"""The benchmark's workloads: real pretrained models on real held-out data (and a tiny one for tests).

- ``nlu``: all-MiniLM-L6-v2 + a new 2-class head on the sarcasm headlines (a fixed training subset of
  the ``train`` split, scored on the disjoint ``test`` split), all linear layers but the head adapted.
- ``nlg``: SmolLM2-135M-Instruct on ``sarcasm-lm`` (prompt "Is this headline sarcastic? ... Answer:",
  completion " yes" / " no"), q/k/v/o adapted, scored by exact match of the greedy first answer token
  over the whole vocabulary on held-out test prompts.
"""

from __future__ import annotations

import torch

DATA_SEED = 0  # which training subset / test rows: fixed, the same for every run


def _rows(ds) -> list[dict]:
    return ds.select_columns(["input_ids", "attention_mask", "labels"]).to_list()


def _cls_eval_batches(rows: list[dict], collate, size: int = 250) -> list[dict]:
    """Held-out batches, examples sorted by length so little time goes into padding (order does not
    change accuracy)."""
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def build_nlu(train_examples: int = 3000, test_examples: int = 2000, max_length: int = 64):
    from benchmarks.quality.harness import Workload
    from goraplan.data import PaddingCollator, label_names_of, load_records, prepare
    from goraplan.models import load_model
    from goraplan.targets import find_target_modules

    labels = label_names_of(load_records("sarcasm", "train"))

    def load(seed: int):
        return load_model("minilm-l6", "seq-cls", label_names=labels, seed=seed, device="cpu")

    model, tok = load(0)
    targets = list(find_target_modules(model, "all-linear"))
    del model
    train, _ = prepare("sarcasm", tok, "seq-cls", split="train", max_length=max_length, seed=DATA_SEED,
                       limit=train_examples, label_names=labels)
    test, _ = prepare("sarcasm", tok, "seq-cls", split="test", max_length=max_length, seed=DATA_SEED,
                      limit=test_examples, label_names=labels)
    collate = PaddingCollator(tok, "seq-cls")
    description = f"minilm-l6 sarcasm train={len(train)} test={len(test)} len={max_length}"
    return Workload(
        name="nlu", task="seq-cls", load_model=load, train_rows=_rows(train),
        eval_batches=_cls_eval_batches(_rows(test), collate), collate=collate, targets=targets,
        batch_size=32, calib_batch_size=8, description=description,
        extra={"model": "all-MiniLM-L6-v2 (minilm-l6)", "data": "sarcasm", "max_length": max_length,
               "labels": labels, "test_examples": len(test)},
    )


def _prompt_eval_batches(tok, prompts: list[str], completions: list[str], max_length: int, size: int = 50):
    """Right-padded prompts, the index of each prompt's last token, and the first completion token."""
    batches = []
    for i in range(0, len(prompts), size):
        ids = [tok(p)["input_ids"][-(max_length - 1):] for p in prompts[i:i + size]]
        targets = [tok(c, add_special_tokens=False)["input_ids"][0] for c in completions[i:i + size]]
        width = max(map(len, ids))
        pad = tok.pad_token_id
        batches.append({
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
            "last": torch.tensor([len(r) - 1 for r in ids]),
            "target": torch.tensor(targets),
        })
    return batches


def build_nlg(train_examples: int = 800, test_examples: int = 300, max_length: int = 64):
    from benchmarks.quality.harness import Workload
    from goraplan.data import PaddingCollator, load_records, prepare
    from goraplan.models import load_model
    from goraplan.targets import find_target_modules

    def load(seed: int):
        return load_model("smollm2-135m", "causal-lm", seed=seed, device="cpu")

    model, tok = load(0)
    tok.padding_side = "right"
    targets = list(find_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    del model
    train, _ = prepare("sarcasm-lm", tok, "causal-lm", split="train", max_length=max_length, seed=DATA_SEED,
                       limit=train_examples)
    test = load_records("sarcasm-lm", "test").shuffle(seed=DATA_SEED).select(range(test_examples))
    collate = PaddingCollator(tok, "causal-lm")
    description = f"smollm2-135m sarcasm-lm train={len(train)} test={len(test)} len={max_length}"
    return Workload(
        name="nlg", task="causal-lm", load_model=load, train_rows=_rows(train),
        eval_batches=_prompt_eval_batches(tok, test["prompt"], test["completion"], max_length), collate=collate,
        targets=targets, batch_size=16, calib_batch_size=8, description=description,
        extra={"model": "SmolLM2-135M-Instruct (smollm2-135m)", "data": "sarcasm-lm", "max_length": max_length,
               "test_examples": len(test), "score": "exact match of the greedy first answer token (' yes' / ' no')"},
    )


def build_tiny(train_examples: int = 64, test_examples: int = 32):
    """A config-built 2-layer BERT on word sequences whose label is whether 'yes' occurs: tests only."""
    import random

    from benchmarks.quality.harness import Workload
    from goraplan.data import PaddingCollator
    from goraplan.targets import find_target_modules
    from tests.tiny import WORDS, make_tokenizer, tiny_bert_cls

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
    return Workload(name="tiny", task="seq-cls", load_model=load, train_rows=train,
                    eval_batches=_cls_eval_batches(test, collate, 16), collate=collate,
                    targets=list(find_target_modules(model, "all-linear")), batch_size=8, calib_batch_size=4,
                    description=f"tiny-bert train={train_examples}")
