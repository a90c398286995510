"""The benchmark's workloads: real pretrained models on held-out data.

- ``nlu``: all-MiniLM-L6-v2 + a new 2-class head on the sarcasm headlines (a fixed training subset of
  the ``train`` split, scored by accuracy on the disjoint ``test`` split), every linear layer but the
  head adapted.
- ``nlg``: SmolLM2-135M-Instruct on three-digit arithmetic (``Q: What is 347 plus 518?\\nA:`` ->
  `` 865``), q/k/v/o adapted, scored on held-out problems by exact match of the greedily generated
  number and by the completion loss (mean token cross-entropy of the answer and end-of-text token).

Why arithmetic, and why generated here: the base model does not solve it (0 of 120 problems in the
format below, greedy), the answer is checkable, and fine-tuning can teach both the answer format and
some of the arithmetic. BIG-bench's ``arithmetic`` task is itself a fixed draw of uniformly random
operands in this "What is A plus B?" form; its archive cannot be fetched here (``pip download
bigbench==1.0.0`` fails while pip prepares its metadata), so the same distribution is drawn with a fixed
seed, and every test problem is kept out of the training set.
"""

from __future__ import annotations

import random
import re

import torch

from benchmarks.quality.harness import COLLAPSE_SHARE, Workload

DATA_SEED = 0  # which training subset / test rows: fixed, the same for every run
ARITHMETIC_PROMPT = "Q: What is {a} {op} {b}?\nA:"
_NUMBER = re.compile(r"\s*(-?\d+)")


# ---------------------------------------------------------------------------------------------------- NLU
def _rows(ds) -> list[dict]:
    return ds.select_columns(["input_ids", "attention_mask", "labels"]).to_list()


def classification_scorer(rows: list[dict], collate, size: int = 250):
    """Accuracy, mean loss and collapse on held-out rows (batched by length: little padding)."""
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def evaluate(model) -> dict:
        preds, gold, loss = [], [], 0.0
        for b in batches:
            out = model(**b)
            preds.append(out.logits.argmax(-1))
            gold.append(b["labels"])
            loss += out.loss.item() * len(b["labels"])
        pred, gold_ = torch.cat(preds), torch.cat(gold)
        return {"accuracy": (pred == gold_).float().mean().item(), "eval_loss": loss / len(pred),
                **_collapse(pred.tolist()), "examples": len(pred),
                "gold_majority_share": gold_.unique(return_counts=True)[1].max().item() / len(gold_)}

    return evaluate


def _collapse(predictions: list) -> dict:
    counts: dict = {}
    for p in predictions:
        counts[p] = counts.get(p, 0) + 1
    top = max(counts, key=counts.get)
    share = counts[top] / len(predictions)
    return {"majority_prediction": top, "majority_share": share, "collapsed": share >= COLLAPSE_SHARE}


def build_nlu(train_examples: int = 3000, test_examples: int = 2000, max_length: int = 64) -> Workload:
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
    return Workload(
        name="nlu", task="seq-cls", load_model=load, train_rows=_rows(train),
        evaluate=classification_scorer(_rows(test), collate), collate=collate, targets=targets,
        batch_size=32, calib_batch_size=8,
        description=f"minilm-l6 sarcasm train={len(train)} test={len(test)} len={max_length}",
        extra={"model": "all-MiniLM-L6-v2 (minilm-l6)", "data": "sarcasm (train split subset / test split)",
               "max_length": max_length, "labels": labels, "test_examples": len(test), "score": "accuracy"},
    )


# ---------------------------------------------------------------------------------------------------- NLG
def arithmetic_problems(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct problems, a third each of three-digit addition, three-digit subtraction (never
    negative) and two-digit times one-digit multiplication; none whose prompt is in `exclude`.

    >>> arithmetic_problems(3, 0)[0]
    {'prompt': 'Q: What is 964 plus 494?\\nA:', 'completion': ' 1458', 'answer': 1458}
    """
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        kind = len(out) % 3
        if kind == 0:
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            op, answer = "plus", a + b
        elif kind == 1:
            a, b = sorted((rng.randint(100, 999), rng.randint(100, 999)), reverse=True)
            op, answer = "minus", a - b
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            op, answer = "times", a * b
        prompt = ARITHMETIC_PROMPT.format(a=a, op=op, b=b)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": f" {answer}", "answer": answer})
    return out


def generation_scorer(tok, problems: list[dict], collate, size: int = 50, max_new_tokens: int = 6):
    """Exact match of the greedy answer's first number, completion loss, collapse (one answer for all)."""
    import datasets

    from goraplan.data import tokenize

    encoded = tokenize(datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "completion")} for p in problems]),
                       tok, "causal-lm", max_length=64)
    rows = _rows(encoded)
    loss_batches = [collate(rows[i:i + size]) for i in range(0, len(rows), size)]
    prompt_batches = []
    for i in range(0, len(problems), size):
        chunk = problems[i:i + size]
        tok.padding_side = "left"  # generation continues every prompt from its last token
        enc = tok([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        tok.padding_side = "right"
        prompt_batches.append((enc, [p["answer"] for p in chunk]))

    def evaluate(model) -> dict:
        tokens = loss_sum = 0.0
        for b in loss_batches:
            n = (b["labels"][:, 1:] != -100).sum().item()  # the model shifts labels by one
            loss_sum += model(**b).loss.item() * n
            tokens += n
        answers, correct = [], 0
        for enc, gold in prompt_batches:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, y in zip(texts, gold, strict=True):
                m = _NUMBER.match(text)
                answers.append(text.strip())
                correct += m is not None and int(m.group(1)) == y
        return {"accuracy": correct / len(answers), "eval_loss": loss_sum / tokens, **_collapse(answers),
                "examples": len(answers), "answer_tokens": int(tokens), "sample_answers": answers[:5]}

    return evaluate


def build_nlg(train_examples: int = 1600, test_examples: int = 500) -> Workload:
    import datasets

    from goraplan.data import PaddingCollator, tokenize
    from goraplan.models import load_model
    from goraplan.targets import find_target_modules

    def load(seed: int):
        return load_model("smollm2-135m", "causal-lm", seed=seed, device="cpu")

    model, tok = load(0)
    tok.padding_side = "right"
    targets = list(find_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"]))
    del model
    test = arithmetic_problems(test_examples, seed=DATA_SEED + 1)
    train = arithmetic_problems(train_examples, seed=DATA_SEED, exclude={p["prompt"] for p in test})
    train_ds = tokenize(datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "completion")} for p in train]),
                        tok, "causal-lm", max_length=64)
    collate = PaddingCollator(tok, "causal-lm")
    return Workload(
        name="nlg", task="causal-lm", load_model=load, train_rows=_rows(train_ds),
        evaluate=generation_scorer(tok, test, collate), collate=collate, targets=targets,
        batch_size=8, calib_batch_size=8,
        description=f"smollm2-135m arithmetic train={len(train)} test={len(test)}",
        extra={"model": "SmolLM2-135M-Instruct (smollm2-135m)",
               "data": "three-digit + and -, two-by-one-digit x (seeded draw, test problems kept out of train)",
               "test_examples": len(test),
               "score": "exact match of the first number in the greedy answer (6 new tokens); completion loss"},
    )
