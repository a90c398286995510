"""Reading what someone else wrote: shown without letting it act, parsed without surprises.

Plans, adapter folders, run records and data files travel between teams, so a string in them may carry
terminal escapes that clear the screen or forge a line of output, and a JSON file may repeat a key (two
readers then see two different values) or hold ``NaN``. Everything printed that came from a file goes
through `printable`; every JSON document read from a file goes through `strict_json`.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Any

from goraplan.errors import GoraError

# Control characters (C0, DEL, C1), format characters (bidirectional overrides, zero-width), line and
# paragraph separators, and lone surrogates (which cannot even be encoded for the terminal).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(value: object) -> str:
    """`value` as one line of inert text: every control or format character written as its escape.

    >>> printable("llama\\x1b[2J\\nmodel ok (verified)")
    'llama\\\\x1b[2J\\\\nmodel ok (verified)'
    >>> printable("model.layers.0.q_proj"), printable(None), printable("caf\\u00e9 \\u202eevil")
    ('model.layers.0.q_proj', 'None', 'café \\\\u202eevil')
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case, and fast: no Cc/Cf/Zl/Zp/Cs/Zs-other-than-space characters
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def strict_json(text: str | bytes, where: object) -> Any:
    """Parse JSON that a file holds, refusing what ``json.loads`` lets through: repeated keys and NaN/Infinity.

    `where` names the file (and line) in the one-sentence error.

    >>> strict_json('{"rank": 8}', "plan.gora")
    {'rank': 8}
    >>> strict_json('{"rank": 8, "rank": 64}', "plan.gora")
    Traceback (most recent call last):
    goraplan.errors.GoraError: plan.gora: JSON key 'rank' appears twice; each key may appear once.
    >>> strict_json('{"alpha": NaN}', "plan.gora")
    Traceback (most recent call last):
    goraplan.errors.GoraError: plan.gora: JSON holds NaN, which is not a number this file may hold.
    >>> strict_json('{"alpha": 1e999}', "plan.gora")
    Traceback (most recent call last):
    goraplan.errors.GoraError: plan.gora: JSON number 1e999 is too large to be finite.
    """
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, where),
                          parse_constant=lambda name: _no_constant(name, where),
                          parse_float=lambda digits: _finite(digits, where))
    except json.JSONDecodeError as exc:
        raise GoraError(f"{printable(where)}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}).") \
            from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # ValueError: an integer of 4300+ digits
        reason = {UnicodeDecodeError: "not UTF-8 text", RecursionError: "nested too deeply"}.get(
            type(exc), "a number too long to read")
        raise GoraError(f"{printable(where)}: not valid JSON ({reason}).") from None


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A JSON file that must hold one object (``adapter_config.json``, ``run.json`` ...), strictly parsed.

    >>> read_json_object("/nonexistent/run.json", "run record")
    Traceback (most recent call last):
    goraplan.errors.GoraError: run record /nonexistent/run.json does not exist.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise GoraError(f"{what} {printable(path)} does not exist.") from None
    except OSError as exc:
        raise GoraError(f"cannot read {what} {printable(path)} ({exc.strerror or exc}).") from None
    data = strict_json(raw, path)
    if not isinstance(data, dict):
        raise GoraError(f"{what} {printable(path)} holds a JSON {type(data).__name__}, not an object: "
                        "restore or regenerate it.")
    return data


def _unique_keys(pairs: list[tuple[str, Any]], where: object) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise GoraError(f"{printable(where)}: JSON key {printable(repr(key))} appears twice; "
                            "each key may appear once.")
        out[key] = value
    return out


def _finite(digits: str, where: object) -> float:
    value = float(digits)
    if not math.isfinite(value):
        raise GoraError(f"{printable(where)}: JSON number {printable(digits[:40])} is too large to be finite.")
    return value


def _no_constant(name: str, where: object) -> Any:
    raise GoraError(f"{printable(where)}: JSON holds {name}, which is not a number this file may hold.")
