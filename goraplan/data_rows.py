"""A data file's rows checked before `datasets` reads them: a bad row is one sentence naming the file and line.

`datasets` reads a JSON-lines file as columns: a row in another format, a ``null`` or a number where text
belongs, or a label written ``1`` on one line and ``"1"`` on another becomes a null cell, a type error deep in
pyarrow or the tokenizer, or a silently wrong label set. Here every line is decoded, parsed strictly and
compared with the first line, so that the error says where the file is wrong (`goraplan build` and
`gorafit run` read data through the same loader, so they refuse the same rows with the same sentence).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goraplan.errors import GoraError
from goraplan.untrusted import printable, strict_json

__all__ = ["check_json_rows", "check_text_columns", "value_kind"]

# Columns whose presence decides the format (see `goraplan.data.detect_format`): rows must agree on them.
# ``input`` (Alpaca) is optional per row.
_FORMAT_COLUMNS = ("text", "prompt", "completion", "messages", "conversations", "instruction", "output", "label")
# Columns that hold text (or, for the conversational formats, lists of messages).
_TEXT_COLUMNS = ("text", "prompt", "completion", "instruction", "input", "output")


def value_kind(value: Any, column: str = "") -> str:
    """What sort of JSON value this is, as the file's rows must agree on it (labels tell integers from floats).

    >>> value_kind("a"), value_kind(1), value_kind(1.5), value_kind(1, "label"), value_kind(None)
    ('text', 'number', 'number', 'integer', 'null')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return ("integer" if isinstance(value, int) else "decimal") if column == "label" else "number"
    if isinstance(value, str):
        return "text"
    return "list" if isinstance(value, list) else "object"


def check_json_rows(path: Path, source: str) -> None:
    """Every row of a JSON-lines file (or every item of a JSON array file) against the first one.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = p.write_text('{"text": "a", "label": 1}\\n{"text": "b", "label": "1"}\\n')
    >>> check_json_rows(p, "d.jsonl")
    Traceback (most recent call last):
    goraplan.errors.GoraError: data file d.jsonl line 2: label is text ('1') but line 1 has an integer: write every label the same way.
    """
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":  # one JSON array of rows
        rows = strict_json(data, f"data file {source}")
        if not isinstance(rows, list):
            raise GoraError(f"data file {printable(source)} holds a JSON {type(rows).__name__}, not rows.")
        _check_rows(((i + 1, row) for i, row in enumerate(rows)), source, "item")
        return
    _check_rows(_json_lines(data, source), source, "line")


def _json_lines(data: bytes, source: str):
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GoraError(f"data file {printable(source)} line {number} is not UTF-8 text (byte "
                            f"0x{raw[exc.start]:02x} at column {exc.start + 1}): save the file as UTF-8.") from None
        yield number, strict_json(text, f"data file {source} line {number}")


def _check_rows(rows, source: str, unit: str) -> None:
    first: dict[str, str] | None = None
    first_number = 0
    empty = 0
    count = 0
    for number, row in rows:
        where = f"data file {printable(source)} {unit} {number}"
        if not isinstance(row, dict):
            raise GoraError(f"{where} holds a JSON {type(row).__name__}, not an object: one example per {unit}, "
                            f'such as {{"text": "..."}}.')
        kinds = {key: value_kind(value, key) for key, value in row.items()}
        for column in _TEXT_COLUMNS:
            if kinds.get(column) in ("null", "number", "true/false", "object"):
                raise GoraError(f"{where}: {column} is {_shown(row[column], kinds[column])}, not text: write it as a "
                                "string (or drop the row).")
        count += 1
        texts = [row[c] for c in _TEXT_COLUMNS if c in row]
        empty += bool(texts) and all(text == "" for text in texts)
        if first is None:
            first, first_number = kinds, number
            continue
        ours = [c for c in _FORMAT_COLUMNS if c in kinds]
        theirs = [c for c in _FORMAT_COLUMNS if c in first]
        if ours != theirs:
            raise GoraError(f"{where} has the columns {', '.join(ours) or 'none of the known ones'} but {unit} "
                            f"{first_number} has {', '.join(theirs) or 'none of the known ones'}: one data format "
                            "per file.")
        for key, kind in kinds.items():
            if key not in first or kind == first[key]:
                continue
            if "null" in (kind, first[key]) and key not in _FORMAT_COLUMNS:
                continue  # other columns (ids, metadata) may be missing on some rows
            article = "an" if first[key][0] in "aeiou" else "a"
            raise GoraError(f"{where}: {printable(key)} is {_shown(row[key], kind)} but {unit} {first_number} has "
                            f"{article} {first[key]}: write every {printable(key)} the same way.")
    if count and empty == count:
        raise GoraError(f"data file {printable(source)}: every example's text is empty; there is nothing to train on.")


def _shown(value: Any, kind: str) -> str:
    if kind == "null":
        return "null"
    return f"{kind} ({printable(repr(value))[:40]})"


def check_text_columns(records, source: str) -> None:
    """After loading any source (CSV, parquet, Hub): a text column that holds numbers, or a missing cell, by row.

    Read from the Arrow table, so a large data set is checked without turning it into Python objects.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = records.data.table if hasattr(records.data, "table") else records.data
    for column in _TEXT_COLUMNS:
        if column not in records.column_names:
            continue
        values = table.column(column)
        kind = values.type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_list(kind)
                or pa.types.is_large_list(kind)):
            raise GoraError(f"data set {printable(source)}: {column} holds {kind} values, not text: write them as "
                            "strings.")
        if values.null_count:
            row = pc.index(pc.is_null(values), True).as_py()
            raise GoraError(f"data set {printable(source)} row {row + 1}: {column} is missing (null): fill it in or "
                            "drop the row.")
