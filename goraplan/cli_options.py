"""Command-line options generated from a pydantic settings model, so each setting is declared once.

A field's type gives the option's type (a ``Literal`` becomes a choice), its description the help text, its
default and bounds the ``[default: ...; x>=1]`` note. Validation stays with the model: every option defaults
to ``None`` ("not given"), the command passes only what was typed, and the model fills in the rest, so a
default or a bound is never typed twice and a config file can sit between the model and the command line.

>>> import click
>>> from pydantic import BaseModel, Field
>>> class S(BaseModel):
...     rank: int = Field(8, ge=1, description="The rank.")
>>> @click.command()
... @settings_options(S)
... def cmd(**given):
...     print(S(**given_values(given)))
>>> cmd(["--rank", "4"], standalone_mode=False)
rank=4
"""

from __future__ import annotations

import functools
import operator
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import annotated_types
import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

__all__ = ["NumberOrWord", "field_help", "given_values", "option_for", "settings_options"]


class NumberOrWord(click.ParamType):
    """A number, or one of a few words (``auto``, ``none``): for fields typed ``float | Literal["auto"]``.

    >>> NumberOrWord(("auto",)).convert("0.5", None, None), NumberOrWord(("auto",)).convert("auto", None, None)
    (0.5, 'auto')
    """

    def __init__(self, words: Sequence[str], number: type = float):
        self.words = tuple(words)
        self.number = number
        self.name = "|".join([number.__name__.upper(), *self.words])

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) or value in self.words:
            return value
        if str(value).lower() in self.words:
            return str(value).lower()
        try:
            return self.number(value)
        except (TypeError, ValueError):
            alternatives = " or ".join(repr(w) for w in self.words)
            self.fail(f"{value!r} is neither a number nor {alternatives}", param, ctx)


def settings_options(
    model: type[BaseModel],
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    decls: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of ``model`` (in field order).

    ``decls`` replaces a field's option names (``{"learning_rate": ("--learning-rate", "--lr")}``; a bool
    field given one name is a plain flag, else ``--name/--no-name``); ``extra`` adds or replaces click keyword
    arguments where the annotation says too little (``{"type": click.Path()}`` for a path). The command's
    keyword argument is the field's name.
    """
    exclude = set(exclude)
    names = [n for n in (only if only is not None else model.model_fields) if n not in exclude]
    options = [
        option_for(name, model.model_fields[name], decls=(decls or {}).get(name), extra=(extra or {}).get(name))
        for name in names
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def given_values(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user typed (click passes ``None`` for the others)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def option_for(name: str, field: FieldInfo, *, decls: Sequence[str] | None = None,
               extra: Mapping[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """One click option for one pydantic field; its default is ``None`` (not given)."""
    flag = "--" + name.replace("_", "-")
    annotation = _without_none(field.annotation)
    is_bool = annotation is bool
    if decls is None:
        decls = (f"{flag}/--no-{flag[2:]}",) if is_bool else (flag,)
    kwargs: dict[str, Any] = {"default": None, "help": field_help(field, is_bool=is_bool)}
    if is_bool:
        if not any("/" in d for d in decls):
            kwargs["is_flag"] = True
    else:
        kwargs["type"] = click_type(annotation)
    return click.option(*decls, name, **{**kwargs, **(extra or {})})


def click_type(annotation: Any) -> click.ParamType:
    """The click type of a field's annotation: a choice for a ``Literal``, a number or a word for a union of
    a number and ``Literal`` words, else int, float or text.

    >>> click_type(Literal["a", "b"]).choices
    ('a', 'b')
    """
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(v) for v in typing.get_args(annotation)])
    if _is_union(annotation):
        arms = [_strip_annotated(a) for a in typing.get_args(annotation)]
        words = [str(v) for a in arms if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        numbers = [a for a in arms if a in (int, float)]
        if words and numbers:
            return NumberOrWord(words, float if float in numbers else int)
        return click.STRING
    annotation = _strip_annotated(annotation)
    return {int: click.INT, float: click.FLOAT}.get(annotation, click.STRING)


def field_help(field: FieldInfo, *, is_bool: bool = False) -> str:
    """The field's description with its default and bounds, as click writes them: ``[default: 8; x>=1]``."""
    notes = []
    default = field.default
    if default is not PydanticUndefined and default is not None and field.default_factory is None:
        if is_bool:
            if default:
                notes.append("default: on")
        else:
            notes.append(f"default: {default}")
    bounds = _bounds(field.metadata)
    if bounds:
        notes.append(bounds)
    text = field.description or ""
    return f"{text}  [{'; '.join(notes)}]" if notes else text


def _bounds(metadata: Sequence[Any]) -> str:
    """pydantic's ge/gt/le/lt in click's notation: ``x>=1``, ``0<=x<1``."""
    low = high = None
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = (item.ge, "<=")
        elif isinstance(item, annotated_types.Gt):
            low = (item.gt, "<")
        elif isinstance(item, annotated_types.Le):
            high = (item.le, "<=")
        elif isinstance(item, annotated_types.Lt):
            high = (item.lt, "<")
    if low and high:
        return f"{low[0]}{low[1]}x{high[1]}{high[0]}"
    if low:
        return f"x{'>=' if low[1] == '<=' else '>'}{low[0]}"
    if high:
        return f"x{high[1]}{high[0]}"
    return ""


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _without_none(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (``None`` is how an option says "not given")."""
    if not _is_union(annotation):
        return annotation
    arms = [a for a in typing.get_args(annotation) if a is not type(None)]
    return functools.reduce(operator.or_, arms)


def _strip_annotated(annotation: Any) -> Any:
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
