"""Data the way people have it: TRL's formats, Alpaca, ShareGPT, column mapping, packing, the collators."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from goraplan import data
from goraplan.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    collator_for,
    detect_format,
    make_batches,
    map_columns,
    pack,
    parse_columns,
    prepare,
    tokenize,
)
from goraplan.errors import GoraError
from tests.tiny import make_tokenizer, sentences, tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    """The tiny word-level tokenizer, with a chat template whose roles are words it knows."""
    tokenizer = make_tokenizer()
    core = tokenizer.backend_tokenizer
    core.add_tokens(["user", "assistant", "system", "Below", "###"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learned(row: dict) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# Formats


def test_detect_format_by_columns_and_by_value_type():
    strings = datasets.Dataset.from_dict({"prompt": ["a"], "completion": ["b"]})
    chats = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "a"}],
                                         "completion": [{"role": "assistant", "content": "b"}]}])
    assert detect_format(strings.features, "causal-lm") == "prompt-completion"
    assert detect_format(chats.features, "causal-lm") == "conversational-prompt-completion"
    assert detect_format(["instruction", "input", "output"], "causal-lm") == "alpaca"
    assert detect_format(["instruction", "output"], "causal-lm") == "alpaca"
    assert detect_format(["conversations", "id"], "causal-lm") == "sharegpt"
    mixed = datasets.Dataset.from_list([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(GoraError, match="both be strings or both be lists of messages"):
        detect_format(mixed.features, "causal-lm")


def test_conversational_prompt_completion_learns_the_completion_only(tok):
    """As TRL does: the prompt rendered with its generation header is masked, the rest is learned."""
    prompt = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "is the sky blue ?"}]
    completion = [{"role": "assistant", "content": "yes the sky is blue ."}]
    out = tokenize(datasets.Dataset.from_list([{"prompt": prompt, "completion": completion}]), tok, "causal-lm")[0]
    whole = tok.apply_chat_template(prompt + completion, tokenize=False)
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert out["input_ids"] == ids_of(tok, whole)
    assert out["labels"][: len(ids_of(tok, prompt_text))] == [IGNORE_INDEX] * len(ids_of(tok, prompt_text))
    assert learned(out) == ids_of(tok, "yes the sky is blue . </s>")


def test_sharegpt_reads_as_messages(tok):
    turns = [{"from": "system", "value": "the cat"}, {"from": "human", "value": "is the sky blue ?"},
             {"from": "gpt", "value": "yes ."}, {"from": "human", "value": "and the sun ?"},
             {"from": "gpt", "value": "no ."}]
    messages = [{"role": r, "content": t["value"]} for r, t in
                zip(["system", "user", "assistant", "user", "assistant"], turns, strict=True)]
    shared = tokenize(datasets.Dataset.from_list([{"conversations": turns}]), tok, "causal-lm")[0]
    direct = tokenize(datasets.Dataset.from_list([{"messages": messages}]), tok, "causal-lm")[0]
    assert shared == direct
    assert learned(shared) == ids_of(tok, "yes . </s> no . </s>")
    bad = datasets.Dataset.from_list([{"conversations": [{"from": "narrator", "value": "x"}]}])
    with pytest.raises(GoraError, match="comes from 'narrator', which is none of human, user, gpt"):
        tokenize(bad, tok, "causal-lm")


def test_alpaca_uses_the_alpaca_prompt_and_learns_the_output(tok):
    rows = [{"instruction": "is the sky blue ?", "input": "", "output": "yes"},
            {"instruction": "is the sun red ?", "input": "the sun", "output": "no"}]
    out = tokenize(datasets.Dataset.from_list(rows), tok, "causal-lm")
    as_pc = data.alpaca_prompt_completion({k: [r[k] for r in rows] for k in rows[0]})
    assert as_pc["prompt"] == [ALPACA_PROMPT.format(instruction="is the sky blue ?"),
                               ALPACA_PROMPT_WITH_INPUT.format(instruction="is the sun red ?", input="the sun")]
    assert out.to_list() == tokenize(datasets.Dataset.from_dict(as_pc), tok, "causal-lm").to_list()
    assert [learned(r) for r in out] == [ids_of(tok, "yes </s>"), ids_of(tok, "no </s>")]


# ---------------------------------------------------------------------------------------------------
# Column mapping


def test_parse_columns_and_its_errors():
    assert parse_columns("prompt=question, completion=answer") == {"prompt": "question", "completion": "answer"}
    assert parse_columns({"text": "body"}) == {"text": "body"} and parse_columns(None) == {}
    with pytest.raises(GoraError, match="'question' is not a column the formats read; map onto one of text"):
        parse_columns("question=prompt")
    with pytest.raises(GoraError, match="entry 'prompt' is not STANDARD=YOURS"):
        parse_columns("prompt")
    with pytest.raises(GoraError, match="names 'text' twice"):
        parse_columns("text=a,text=b")


def test_column_mapping_through_prepare(tok, tmp_path):
    rows = [{"question": f"is the {w} big ?", "answer": "yes", "text": "unused"} for w in ("cat", "dog", "sun")]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    ds, info = prepare(str(path), tok, "causal-lm", columns="prompt=question,completion=answer")
    assert info.format == "prompt-completion" and info.columns == {"prompt": "question", "completion": "answer"}
    assert sorted(learned(r) for r in ds) == [ids_of(tok, "yes </s>")] * 3
    mapped = map_columns(datasets.Dataset.from_list(rows), {"text": "question"})
    assert mapped.column_names == ["text", "answer"] and mapped["text"][0] == "is the cat big ?"
    with pytest.raises(GoraError, match=r"names 'query', which the data set does not have \(its columns: question"):
        prepare(str(path), tok, "causal-lm", columns="prompt=query,completion=answer")


# ---------------------------------------------------------------------------------------------------
# Packing


def tokenized_text(tok, n: int = 12, seed: int = 0) -> datasets.Dataset:
    return tokenize(datasets.Dataset.from_dict({"text": sentences(n, seed)}), tok, "causal-lm", max_length=32)


def test_pack_keeps_every_label_and_restarts_positions(tok):
    ds = tokenized_text(tok)
    rows = pack(ds, 24)
    assert all(len(r["input_ids"]) <= 24 for r in rows) and len(rows) < len(ds)
    assert sum((r["input_ids"] for r in rows), []) == sum(ds["input_ids"], [])
    examples = iter(ds)
    for row in rows:  # split each row at its position restarts: one piece per example, in order
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for begin, end in zip(starts, starts[1:]):
            example = next(examples)
            assert row["input_ids"][begin:end] == example["input_ids"]
            assert row["position_ids"][begin:end] == list(range(end - begin))
            # the loss mask is the example's own, except its first token (it would be predicted across the boundary)
            assert row["labels"][begin:end] == [IGNORE_INDEX] + example["labels"][1:]
    assert next(examples, None) is None


def test_pack_keeps_prompt_masks_of_prompt_completion(tok, tmp_path):
    rows = [{"prompt": f"is the {w} big ?", "completion": "yes the cat"} for w in ("cat", "dog", "sun", "car")]
    packed, info = prepare(str(write_jsonl(tmp_path / "pc.jsonl", rows)), tok, "causal-lm", packing=True, max_length=64)
    assert info.packed and len(packed) == 1
    assert learned(packed[0]) == ids_of(tok, "yes the cat </s>") * 4
    with pytest.raises(GoraError, match="a seq-cls data set cannot be packed"):
        prepare(str(tmp_path / "pc.jsonl"), tok, "seq-cls", packing=True)


def test_packed_rows_attend_only_within_each_example(tok):
    """The packed forward pass gives each example the logits (and the loss) it has on its own."""
    model = tiny_llama(vocab_size=len(tok)).eval()
    ds = tokenized_text(tok, n=8, seed=3)
    rows = pack(ds, 40)
    batch = collator_for(tok, "causal-lm", packed=True)(rows.to_list())
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(rows)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in ds["input_ids"]]
        packed_loss = model(**batch).loss
    pieces = []
    for r, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        pieces += [packed_logits[r, begin:end] for begin, end in zip(starts, starts[1:])]
    assert len(pieces) == len(alone)
    for piece, single in zip(pieces, alone, strict=True):
        torch.testing.assert_close(piece, single, rtol=1e-5, atol=1e-5)
    # the mean loss over every learned token, packed, equals the token-weighted mean of the examples' own losses
    token_losses = []
    for ids, single in zip(ds["input_ids"], alone, strict=True):
        target = torch.tensor(ids[1:])
        token_losses.append(torch.nn.functional.cross_entropy(single[:-1], target, reduction="none"))
    torch.testing.assert_close(packed_loss, torch.cat(token_losses).mean(), rtol=1e-5, atol=1e-6)


def test_make_batches_of_packed_rows(tok):
    rows = pack(tokenized_text(tok, n=20), 24)
    batches = make_batches(rows, collator_for(tok, "causal-lm", packed=True), 2, 2)
    first = batches[0]
    assert set(first) == {"input_ids", "labels", "position_ids", "use_cache"} and first["use_cache"] is False
    width = first["input_ids"].shape[1]
    for i in range(2):
        n = len(rows[i]["input_ids"])
        assert first["position_ids"][i].tolist() == rows[i]["position_ids"] + list(range(width - n))
        assert first["labels"][i, n:].eq(IGNORE_INDEX).all()


# ---------------------------------------------------------------------------------------------------
# The collators are transformers' own: the same batches as padding by hand


def pad_by_hand(rows: list[dict], pad_id: int, left: bool) -> dict[str, list]:
    width = max(len(r["input_ids"]) for r in rows)

    def pad(values, fill):
        extra = [fill] * (width - len(values))
        return extra + list(values) if left else list(values) + extra

    return {"input_ids": [pad(r["input_ids"], pad_id) for r in rows],
            "attention_mask": [pad(r["attention_mask"], 0) for r in rows],
            "labels": [pad(r["labels"], IGNORE_INDEX) for r in rows]}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_equals_padding_by_hand(tok, side):
    tok.padding_side = side
    try:
        rows = tokenized_text(tok, n=9).to_list()
        batch = collator_for(tok, "causal-lm")(rows)
        expected = pad_by_hand(rows, tok.pad_token_id, left=side == "left")
        assert {k: v.tolist() for k, v in batch.items()} == expected
        assert all(v.dtype == torch.long for v in batch.values())
        cls_rows = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": i % 3}
                    for i, r in enumerate(rows)]
        cls = collator_for(tok, "seq-cls")(cls_rows)
        assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [i % 3 for i in range(9)]
        assert cls["input_ids"].tolist() == expected["input_ids"]
        assert cls["attention_mask"].tolist() == expected["attention_mask"]
    finally:
        tok.padding_side = "right"


def test_collator_needs_a_pad_token():
    no_pad = make_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(GoraError, match="the tokenizer has no pad token"):
        collator_for(no_pad, "causal-lm")


# ---------------------------------------------------------------------------------------------------
# Slow: SmolLM2's own tokenizer and weights


@pytest.mark.slow
def test_smollm2_formats_and_packing():
    from goraplan.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    prompt = [{"role": "user", "content": "Is the sky blue?"}]
    completion = [{"role": "assistant", "content": "Yes, on a clear day."}]
    rows = [{"prompt": prompt, "completion": completion},
            {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant",
                                                                                       "content": "Red."}]}]
    ds = tokenize(datasets.Dataset.from_list(rows), tokenizer, "causal-lm")
    assert tokenizer.decode(learned(ds[0])) == "Yes, on a clear day.<|im_end|>"
    assert tokenizer.decode(learned(ds[1])) == "Red.<|im_end|>"
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}]
    assert tokenizer.decode(learned(tokenize(datasets.Dataset.from_list(sharegpt), tokenizer, "causal-lm")[0])) \
        == "Hello!<|im_end|>"
    rows = pack(ds, 128)
    batch = collator_for(tokenizer, "causal-lm", packed=True)(rows.to_list())
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        second = model(input_ids=torch.tensor([ds[1]["input_ids"]])).logits[0]
    start = len(ds[0]["input_ids"])
    torch.testing.assert_close(packed[start:start + len(ds[1]["input_ids"])], second, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# goraplan build --columns --packing


def test_build_reads_mapped_columns_and_packs(tiny_model_dir, tmp_path, capsys, cli_env):
    from goraplan.cli import cli
    from goraplan.cli_support import run_cli
    from goraplan.plan import load_plan

    rows = [{"question": f"is the {a} {b} ?", "answer": f"yes the {a} is {b}"}
            for a in ("cat", "dog", "sun", "car") for b in ("big", "red", "small", "fast")]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    args = ["build", "--model", tiny_model_dir, "--data", path, "--steps", 2, "--batch-size", 2, "--rank", 4,
            "--max-length", 32]
    for extra, name in (([], "plain"), (["--packing"], "packed")):
        with pytest.raises(SystemExit) as exc:
            run_cli(cli, [str(a) for a in [*args, "--columns", "prompt=question,completion=answer", *extra,
                                           "-o", tmp_path / f"{name}.gora"]])
        assert exc.value.code == 0, capsys.readouterr().err
    plain, packed = load_plan(tmp_path / "plain.gora").manifest, load_plan(tmp_path / "packed.gora").manifest
    assert plain.calibration.examples == 4 and packed.calibration.examples == 4  # rows of 2 steps x 2
    assert packed.calibration.token_fingerprint != plain.calibration.token_fingerprint
    with pytest.raises(SystemExit) as exc:
        run_cli(cli, [str(a) for a in [*args, "-o", tmp_path / "x.gora"]])
    assert exc.value.code == 2 and "--columns prompt=question" in capsys.readouterr().err


@pytest.mark.slow
def test_conversational_prompt_completion_matches_trl():
    """TRL's own SFTTrainer tokenizes the same rows to the same ids, and learns the same completion tokens
    (TRL also learns the newline the template writes after the end-of-turn marker; we leave it out, as for
    messages)."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from goraplan.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    rows = [{"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is the sky blue?"}],
             "completion": [{"role": "assistant", "content": "Yes, on a clear day."}]},
            {"prompt": [{"role": "user", "content": "Name a colour."}],
             "completion": [{"role": "assistant", "content": "Red."}]}]
    ours = tokenize(datasets.Dataset.from_list(rows), tokenizer, "causal-lm", max_length=256)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    trainer = trl.SFTTrainer(model=model, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows),
                             args=trl.SFTConfig(output_dir="unused", report_to=[], completion_only_loss=True, bf16=False,
                                                max_length=256))
    for mine, theirs in zip(ours, trainer.train_dataset, strict=True):
        assert mine["input_ids"] == theirs["input_ids"]
        trl_learned = [t for t, label in zip(theirs["input_ids"], theirs["labels"], strict=True) if label != IGNORE_INDEX]
        assert tokenizer.decode(trl_learned).rstrip("\n") == tokenizer.decode(learned(mine))
