"""``ConfigError`` and the schema's building block: a pydantic dataclass whose failures are one line."""

import dataclasses
import functools
import types
import typing
from typing import Literal, Optional, Tuple, Union

import pydantic
from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one actionable line."""


# Unknown keys are refused; Python callers get pydantic's lax conversions, files are read strictly (loading.py).
_SECTION_CONFIG = pydantic.ConfigDict(extra="forbid")
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


@typing.dataclass_transform(field_specifiers=(dataclasses.field,))
def section(cls):
    """``cls`` as a pydantic dataclass: fields checked on construction (also by ``dataclasses.replace``),
    a failure raised as a one-line ``ConfigError`` that names ``Class.field``."""
    cls = pydantic.dataclasses.dataclass(cls, config=_SECTION_CONFIG)
    validating_init = cls.__init__

    @functools.wraps(validating_init)
    def __init__(self, *args, **kwargs):
        try:
            validating_init(self, *args, **kwargs)
        except ValidationError as err:
            raise ConfigError(describe_error(err, cls, f"{cls.__name__}.")) from None

    cls.__init__ = __init__
    return cls


def describe_error(err: ValidationError, root: type, where: str = "") -> str:
    """The first problem of ``err`` (from validating ``root``) as one line: the dotted key after
    ``where``, what it accepts and the value it got; for an unknown key, the section's known keys."""
    problem = err.errors()[0]
    loc, value, context = problem["loc"], problem["input"], problem.get("ctx") or {}
    if loc and isinstance(loc[0], int):  # a positional argument of the constructor
        loc = (dataclasses.fields(root)[loc[0]].name, *loc[1:])
    key = where + _dotted(loc) if loc else where.rstrip(" .:") or "the config"
    if problem["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = sorted(f.name for f in dataclasses.fields(_without_none(_hint_at(root, loc[:-1]))))
        return f"unknown config key {key} (known: {', '.join(known)})"
    bound = next((f"{op} {context[name]}" for name, op in _BOUNDS if name in context), None)
    hint = _hint_at(root, loc)
    if bound is None and hint is None:
        return f"{key}: {problem['msg']}, got {value!r}"
    return f"{key} must be {bound or _accepts(hint)}, got {value!r}"


def _dotted(loc: Tuple) -> str:
    """``("model", "trainable", 1)`` as ``model.trainable[1]``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _hint_at(root: type, loc: Tuple) -> Optional[type]:
    """The declared type at ``loc`` (field names and list positions) below dataclass ``root``."""
    hint = root
    for part in loc:
        hint = _without_none(hint)
        if isinstance(part, int) and typing.get_origin(hint) is list:
            hint = typing.get_args(hint)[0]
        elif isinstance(part, str) and dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(part)
        else:
            return None
    return hint


def _without_none(hint):
    if typing.get_origin(hint) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _accepts(hint) -> str:
    """What a field of type ``hint`` accepts, in words: ``int or null``, ``bf16 or fp32``, ``a mapping``."""
    inner = _without_none(hint)
    if typing.get_origin(inner) is Literal:
        *rest, last = [*map(str, typing.get_args(inner)), *(["null"] if inner is not hint else [])]
        return f"{', '.join(rest)} or {last}" if rest else last
    if inner is not hint:
        return f"{_accepts(inner)} or null"
    if typing.get_origin(hint) is list:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))
