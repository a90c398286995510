"""Data: loading sources, format detection, loss masks, batching, and the built-in data sets."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import datasets
import pytest
import torch

from goraplan import data
from goraplan.data import (
    IGNORE_INDEX,
    collator_for,
    detect_format,
    label_names_of,
    load_records,
    make_batches,
    prepare,
    split_train_eval,
    tokenize,
)
from goraplan.errors import GoraError

WORDS = "hello world hi there how are you fine thanks yes no is this a good day bad 2 + = 4".split()
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with eos, pad and a chat template: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(("columns", "task", "expected"), [
    (["text"], "causal-lm", "text"),
    (["prompt", "completion"], "causal-lm", "prompt-completion"),
    (["messages", "text"], "causal-lm", "messages"),
    (["prompt", "completion", "text"], "causal-lm", "prompt-completion"),
    (["text", "label", "id"], "seq-cls", "classification"),
])
def test_detect_format(columns, task, expected):
    assert detect_format(columns, task) == expected


def test_detect_format_missing_columns_lists_found_and_needed():
    with pytest.raises(GoraError, match=r"columns question, answer; causal-lm needs messages, prompt and completion, "
                                        r"text, .* --columns prompt=question,completion=answer"):
        detect_format(["question", "answer"], "causal-lm")
    with pytest.raises(GoraError, match=r"columns sentence, label; seq-cls needs the columns text and label"):
        detect_format(["sentence", "label"], "seq-cls")
    with pytest.raises(GoraError, match="unknown task 'summarize'"):
        detect_format(["text"], "summarize")


def test_label_names_classlabel_strings_and_ints():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["neg", "pos"])}))
    assert label_names_of(ds) == ["neg", "pos"]
    assert label_names_of(datasets.Dataset.from_dict({"text": list("abc"), "label": ["pos", "neg", "pos"]})) == ["neg", "pos"]
    assert label_names_of(datasets.Dataset.from_dict({"text": list("abc"), "label": [10, 2, 10]})) == ["2", "10"]
    with pytest.raises(GoraError, match="no label column"):
        label_names_of(datasets.Dataset.from_dict({"text": ["a"]}))


# ---------------------------------------------------------------------------------------------------
# Tokenisation and loss masks


def test_prompt_completion_masks_exactly_the_prompt(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["is this a good day", "hi"], "completion": ["yes", "hello there"]})
    out = tokenize(ds, tokenizer, "causal-lm")
    eos = tokenizer.eos_token_id
    for row, prompt, completion in zip(out, ds["prompt"], ds["completion"], strict=True):
        p, c = ids_of(tokenizer, prompt), ids_of(tokenizer, completion) + [eos]
        assert row["input_ids"] == p + c
        assert row["labels"] == [IGNORE_INDEX] * len(p) + c
        assert row["attention_mask"] == [1] * (len(p) + len(c))


def test_text_learns_every_token_and_ends_with_eos(tokenizer):
    out = tokenize(datasets.Dataset.from_dict({"text": ["hello world"]}), tokenizer, "causal-lm")
    expected = ids_of(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert out[0]["input_ids"] == expected and out[0]["labels"] == expected


def test_truncation_drops_examples_left_without_labels(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["how are you fine thanks", "hi"], "completion": ["yes", "no"]})
    out = tokenize(ds, tokenizer, "causal-lm", max_length=4)
    assert len(out) == 1  # the long prompt fills all 4 tokens: nothing left to learn, so it is dropped
    assert out[0]["labels"] == [IGNORE_INDEX, ids_of(tokenizer, "no")[0], tokenizer.eos_token_id]
    assert all(len(r) <= 4 for r in tokenize(ds, tokenizer, "causal-lm", max_length=4)["input_ids"])


def test_messages_label_only_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "a good day"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you"},
                {"role": "assistant", "content": "fine thanks"}]
    out = tokenize(datasets.Dataset.from_list([{"messages": messages}]), tokenizer, "causal-lm")[0]
    learned = [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX]
    assert learned == ids_of(tokenizer, "hello there <eos> fine thanks <eos>")
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(out["input_ids"], out["labels"], strict=True))
    assert out["input_ids"] == ids_of(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))


def test_messages_errors(tokenizer):
    no_assistant = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(GoraError, match="no assistant turn"):
        tokenize(no_assistant, tokenizer, "causal-lm")
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    ok = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(GoraError, match="no chat template"):
        tokenize(ok, plain, "causal-lm")


def test_classification_labels_are_class_indices(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["good day", "bad day", "good"], "label": ["pos", "neg", "pos"]})
    out = tokenize(ds, tokenizer, "seq-cls")
    assert out["labels"] == [1, 0, 1]
    assert tokenize(ds, tokenizer, "seq-cls", label_names=["pos", "neg"])["labels"] == [0, 1, 0]
    with pytest.raises(GoraError, match="label 'neg' is not one of the labels pos, other"):
        tokenize(ds, tokenizer, "seq-cls", label_names=["pos", "other"])


def test_classification_with_classlabel_maps_by_name(tokenizer):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features)
    assert tokenize(ds, tokenizer, "seq-cls")["labels"] == [1, 0]
    assert tokenize(ds, tokenizer, "seq-cls", label_names=["pos", "neg"])["labels"] == [0, 1]


# ---------------------------------------------------------------------------------------------------
# Loading local sources


ROWS = [{"text": f"hello {i}", "label": "yes" if i % 2 else "no"} for i in range(12)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_local_files(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    frame = datasets.Dataset.from_list(ROWS)
    {".jsonl": lambda: write_jsonl(path, ROWS), ".json": lambda: path.write_text(json.dumps(ROWS)),
     ".csv": lambda: frame.to_csv(str(path), index=False), ".parquet": lambda: frame.to_parquet(str(path))}[suffix]()
    ds = load_records(str(path))
    assert ds.num_rows == 12 and ds["text"] == [r["text"] for r in ROWS] and set(ds.column_names) == {"text", "label"}


def test_load_local_folders(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:8]),
                          "test": datasets.Dataset.from_list(ROWS[8:])}).save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "saved"), "test").num_rows == 4
    assert data.list_splits(str(tmp_path / "saved")) == ["train", "test"]
    with pytest.raises(GoraError, match="has no split 'validation': use one of train, test"):
        load_records(str(tmp_path / "saved"), "validation")
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", ROWS[:10])
    write_jsonl(tmp_path / "files" / "test.jsonl", ROWS[10:])
    assert load_records(str(tmp_path / "files"), "train").num_rows == 10
    assert load_records(str(tmp_path / "files"), "test").num_rows == 2


def test_missing_and_bad_local_paths(tmp_path):
    with pytest.raises(GoraError, match=r"data file ./nowhere.jsonl does not exist"):
        load_records("./nowhere.jsonl")
    with pytest.raises(GoraError, match=r"data file missing.csv does not exist"):
        load_records("missing.csv")
    with pytest.raises(GoraError, match=r"data file /no/such/dir does not exist"):
        load_records("/no/such/dir")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GoraError, match=r"unknown type '.txt'"):
        load_records(str(tmp_path / "notes.txt"))
    single = write_jsonl(tmp_path / "one.jsonl", ROWS)
    with pytest.raises(GoraError, match="single split; there is no split 'test'"):
        load_records(str(single), "test")
    with pytest.raises(GoraError, match="data set sarcasm has no split 'dev': use one of train, test"):
        load_records("sarcasm", "dev")


def test_hub_failure_names_source_and_aliases(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(GoraError, match=r"could not load data set 'no-such-org/no-such-data'.*sarcasm, sarcasm-lm, quotes, chat"):
        load_records("no-such-org/no-such-data")


# ---------------------------------------------------------------------------------------------------
# prepare, collator, batches, splits


@pytest.fixture()
def pc_file(tmp_path) -> Path:
    rows = [{"prompt": f"is this a good day {i}", "completion": "yes" if i % 2 else "no"} for i in range(40)]
    return write_jsonl(tmp_path / "pc.jsonl", rows)


def test_prepare_shuffles_deterministically(tokenizer, pc_file):
    a, info = prepare(str(pc_file), tokenizer, "causal-lm", seed=3)
    b, _ = prepare(str(pc_file), tokenizer, "causal-lm", seed=3)
    c, _ = prepare(str(pc_file), tokenizer, "causal-lm", seed=4)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    assert sorted(map(tuple, a["input_ids"])) == sorted(map(tuple, c["input_ids"]))
    assert info == data.DataInfo(source=str(pc_file), split="train", format="prompt-completion", examples=40)
    limited, info = prepare(str(pc_file), tokenizer, "causal-lm", seed=3, limit=7)
    assert info.examples == 7 and limited["input_ids"] == a["input_ids"][:7]


def test_prepare_classification_records_label_names(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "cls.jsonl", ROWS)
    ds, info = prepare(str(path), tokenizer, "seq-cls")
    assert info.format == "classification" and info.label_names == ["no", "yes"] and len(ds) == 12


def test_collator_pads_causal_and_classification(tokenizer):
    rows = [{"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": [-100, 8, 9]},
            {"input_ids": [7], "attention_mask": [1], "labels": [7]}]
    batch = collator_for(tokenizer, "causal-lm")(rows)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[7, 8, 9], [7, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 8, 9], [7, -100, -100]]
    cls = collator_for(tokenizer, "seq-cls")([{**rows[0], "labels": 1}, {**rows[1], "labels": 0}])
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [1, 0]


def test_make_batches_in_order_and_too_few_error(tokenizer, pc_file):
    ds, _ = prepare(str(pc_file), tokenizer, "causal-lm")
    batches = make_batches(ds, collator_for(tokenizer, "causal-lm"), batch_size=4, n_batches=3)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    assert batches[1]["input_ids"][0].tolist()[: len(ds[4]["input_ids"])] == ds[4]["input_ids"]
    with pytest.raises(GoraError, match=r"data set pc.jsonl has only 40 usable examples; 64 steps x batch size 4 "
                                        r"needs 256: lower --steps or --batch-size"):
        make_batches(ds, collator_for(tokenizer, "causal-lm"), 4, 64, source="pc.jsonl")


def test_split_train_eval(tokenizer):
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(50)]})
    train, held = split_train_eval(ds, 0.2, seed=0)
    assert (len(train), len(held)) == (40, 10) and not set(train["text"]) & set(held["text"])
    assert split_train_eval(ds, 0.2, seed=0)[1]["text"] == held["text"]
    with pytest.raises(GoraError, match="between 0 and 1"):
        split_train_eval(ds, 1.5, seed=0)


# ---------------------------------------------------------------------------------------------------
# Built-in data sets, from small stand-ins for the package files (the real ones are in the slow tests)


def fake_wheel(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


@pytest.fixture()
def fake_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("GORA_CACHE", str(tmp_path / "cache"))
    headlines = [f"headline number {i}" for i in range(2100)] + ["report: make it stop"] * 3
    sarcasm = "".join(json.dumps({"input": [{"role": "system", "content": "..."}, {"role": "user", "content": h}],
                                  "ideal": str(i % 2)}) + "\n" for i, h in enumerate(headlines))
    quotes = "".join(json.dumps({"text": f"quote {i}", "type": "x"}) + "\n" for i in range(5))
    evals = fake_wheel(tmp_path / "evals.whl", {"evals/registry/data/sarcasm/samples.jsonl": sarcasm,
                                                "evals/registry/data/text_compression/samples.jsonl": quotes})
    chat_yaml = "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n- - How are you?\n  - Fine\n  - Good.\n"
    chatterbot = fake_wheel(tmp_path / "chat.whl", {"chatterbot_corpus/data/english/greetings.yml": chat_yaml,
                                                    "chatterbot_corpus/data/spanish/x.yml": "conversations: []"})
    monkeypatch.setattr(data, "package_file", lambda name, version: evals if name == "evals" else chatterbot)
    return len(headlines)


def test_alias_sarcasm_split_is_fixed_and_disjoint(fake_packages):
    train, test = load_records("sarcasm", "train"), load_records("sarcasm", "test")
    assert train.num_rows + test.num_rows == fake_packages and test.num_rows == 2000
    assert not set(train["text"]) & set(test["text"])  # the repeated headline stays on one side
    assert label_names_of(train) == ["not_sarcastic", "sarcastic"]
    row = load_records("sarcasm-lm", "test")[0]
    assert row["completion"] in (" yes", " no") and row["prompt"].startswith("Is this headline sarcastic?")
    assert row["prompt"].endswith("\nAnswer:") and f"Headline: {test[0]['text']}\n" in row["prompt"]
    assert row["completion"] == (" yes" if test[0]["label"] == 1 else " no")


def test_alias_quotes_and_chat(fake_packages):
    assert load_records("quotes")["text"] == [f"quote {i}" for i in range(5)]
    chat = load_records("chat")["messages"]
    assert chat == [[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}],
                    [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine"}]]


# ---------------------------------------------------------------------------------------------------
# Slow: the real package files and SmolLM2's chat template


@pytest.mark.slow
def test_real_sarcasm_counts_and_split():
    train, test = load_records("sarcasm", "train"), load_records("sarcasm", "test")
    assert train.num_rows + test.num_rows == 28_614 and test.num_rows == 2000
    assert not set(train["text"]) & set(test["text"])
    assert load_records("sarcasm-lm", "test")["prompt"][0].endswith(f"Headline: {test[0]['text']}\nAnswer:")
    assert load_records("quotes").num_rows == 400
    assert load_records("chat").num_rows == 2026


@pytest.mark.slow
def test_smollm2_chat_template_masks_only_assistant_turns():
    from goraplan.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]
    ids, labels = data.chat_tokens(messages, tokenizer)
    learned = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert learned == "Hello there!<|im_end|>Fine, thanks.<|im_end|>"
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_package_download_reuses_cache_and_reports_pip_failure(tmp_path, monkeypatch):
    import subprocess

    from goraplan import cache

    monkeypatch.setenv("GORA_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    wheel = tmp_path / "downloads" / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    wheel.write_bytes(b"")
    assert cache.package_file("chatterbot-corpus", "1.3.3") == wheel  # already there: no pip call
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for evals==3.0.1.post1")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(GoraError, match=r"could not download evals==3.0.1.post1 with pip \(ERROR: No matching.*"
                                        r"pip download --no-deps evals==3.0.1.post1 -d "):
        cache.package_file("evals", "3.0.1.post1")


def test_messages_fall_back_to_generation_marks(tokenizer):
    """A template that is not prefix-stable (here: a closing token after the last turn) but marks
    assistant turns with {% generation %} still gets exact masks."""
    marked = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    marked.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }} <eos>{% endgeneration %}{% else %}{{ m['content'] }} <eos>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}<|system|>"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    ids, labels = data.chat_tokens(messages, marked)
    learned = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert learned == ids_of(tokenizer, "hello there <eos> fine <eos>")
    marked.chat_template = marked.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(GoraError, match="assistant turns cannot be found"):
        data.chat_tokens(messages, marked)
