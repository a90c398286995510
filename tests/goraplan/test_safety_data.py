"""Hostile data files: each bad row is one sentence naming the file and line, in `goraplan build` and in
`gorafit run` alike (one loader); random edits of the rows give valid batches or that sentence, nothing else."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goraplan.cli import cli
from goraplan.data import collator_for, make_batches, prepare
from goraplan.errors import GoraError
from tests.cli_runner import run_command
from tests.tiny import make_tokenizer, sentences

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
GOOD = [{"prompt": s + " :", "completion": " " + s.split()[0]} for s in sentences(12, seed=5)]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


HOSTILE = {
    "mixed-formats": (jsonl(GOOD[:3] + [{"text": "a plain text row"}] + GOOD[3:]), "line 4"),
    "null-completion": (jsonl(GOOD[:2] + [{"prompt": "x :", "completion": None}]), "line 3"),
    "numeric-prompt": (jsonl(GOOD[:1] + [{"prompt": 7, "completion": " y"}]), "line 2"),
    "non-utf8": (jsonl(GOOD[:5]) + b'{"prompt": "caf\xe9 :", "completion": " x"}\n', "line 6"),
    "not-an-object": (jsonl(GOOD[:2]) + b'["prompt", "completion"]\n', "line 3"),
    "broken-json": (jsonl(GOOD[:3]) + b'{"prompt": "x :", "completion": \n', "line 4"),
    "nan": (jsonl(GOOD[:3]) + b'{"prompt": "x :", "completion": " y", "weight": NaN}\n', "line 4"),
    "duplicate-key": (jsonl(GOOD[:1]) + b'{"prompt": "x :", "completion": " y", "completion": " z"}\n', "line 2"),
    "all-empty": (jsonl([{"text": ""}] * 12), "empty"),
}
LABELS = {
    "labels-1-and-'1'": (jsonl([{"text": s, "label": i % 2 if i != 5 else "1"} for i, s in enumerate(sentences(12))]),
                         "line 6"),
    "single-class": (jsonl([{"text": s, "label": "only"} for s in sentences(12)]), "single class"),
}


def cli_run(group, args, capsys):
    return run_command(group, args, capsys)


def one_sentence(code, err, *fragments):
    lines = err.rstrip("\n").split("\n")
    assert code == 2 and lines[-1].startswith("Error: ") and "Traceback" not in err, err
    assert sum(line.startswith("Error: ") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], err


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(LABELS))
def test_build_names_the_file_and_line(case, tiny_model_dir, tmp_path, capsys, cli_env):
    content, where = {**HOSTILE, **LABELS}[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_bytes(content)
    task = ["--task", "seq-cls"] if case in LABELS else []
    code, _, err = cli_run(cli, ["build", "--model", tiny_model_dir, "--data", data, *task, "--steps", 2,
                                 "--batch-size", 2, "-o", tmp_path / "p.gora"], capsys)
    one_sentence(code, err, where)
    assert data.name in err or case in ("single-class",)
    assert not (tmp_path / "p.gora").exists()


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    from tests.gorafit.test_train import make_run_inputs

    return make_run_inputs(tmp_path_factory.mktemp("data-safety"), "causal-lm", n=24)


@pytest.mark.parametrize("case", ["mixed-formats", "non-utf8", "null-completion", "all-empty"])
def test_run_refuses_the_same_rows_with_the_same_sentence(case, run_inputs, tmp_path, capsys, cli_env):
    from gorafit.cli import cli as gorafit_cli

    content, where = HOSTILE[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_bytes(content)
    code, _, build_err = cli_run(cli, ["build", "--model", run_inputs["model"], "--data", data, "--steps", 2,
                                       "--batch-size", 2, "-o", tmp_path / "p.gora"], capsys)
    code, _, err = cli_run(gorafit_cli, ["run", run_inputs["plan"], "--data", data, "-o", tmp_path / "run",
                                         "--report-to", "none", "--disable-tqdm"], capsys)
    one_sentence(code, err, where)
    assert err.rstrip("\n").split("\n")[-1] == build_err.rstrip("\n").split("\n")[-1]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ property
WORK = Path(tempfile.mkdtemp(prefix="gora-data-property-"))
TOKENIZER = make_tokenizer()
values = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8) | \
    st.lists(st.text(max_size=4), max_size=2) | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
row_edit = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["prompt", "completion", "text", "label", "extra"]), values),
    st.tuples(st.just("drop"), st.sampled_from(["prompt", "completion"]), st.none()),
    st.tuples(st.just("raw"), st.none(), st.binary(max_size=12)),
    st.tuples(st.just("blank"), st.none(), st.none()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, len(GOOD) - 1), row_edit), min_size=1, max_size=4))
def test_edited_rows_give_batches_or_one_sentence(edits):
    lines = [json.dumps(r).encode() for r in GOOD]
    rows = [dict(r) for r in GOOD]
    for index, (kind, key, value) in edits:
        if kind == "set":
            rows[index][key] = value
            lines[index] = json.dumps(rows[index]).encode()
        elif kind == "drop":
            rows[index].pop(key, None)
            lines[index] = json.dumps(rows[index]).encode()
        elif kind == "raw":
            lines[index] = value
        else:
            lines[index] = b"   "
    path = WORK / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        ds, info = prepare(str(path), TOKENIZER, "causal-lm", max_length=16)
        if len(ds) >= 2:
            batches = make_batches(ds, collator_for(TOKENIZER, "causal-lm"), 2, 1, source=str(path))
            assert batches[0]["input_ids"].shape[0] == 2
    except GoraError as exc:
        message = str(exc)
        assert "\n" not in message and not CONTROL.search(message), repr(message)
