"""Strict, typed configuration from string maps (hyperparameters.json, environment variables).

SageMaker hands hyperparameters over as strings, encoded differently by each client
(SageMaker's "Use hyperparameters" guide and the SDKs' own serialisers):

    raw API / CLI, SDK v2 Estimator:   "0.1"  "True"  "abc"      "['q_proj', 'v_proj']"
    SDK v2 Framework/source_dir:       "0.1"  "true"  "\"abc\""  "[\"q_proj\", \"v_proj\"]"
    SDK v3 ModelTrainer:               "0.1"  "true"  "abc"      "[\"q_proj\", \"v_proj\"]"

`coerce` decodes all of them to the same typed value, given the field's type. `from_strings` builds a
frozen dataclass from such a map: unknown keys are errors naming the nearest valid key, and fields
with `choices` metadata reject other values naming the nearest valid choice.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import re
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")
# scheme://user:password@host: refused wherever a URI is configured (train and launch), as it would be logged.
URI_WITH_PASSWORD = re.compile(r"//[^/]*@")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message says what to use instead."""


def nearest(name: str, valid: typing.Iterable[str]) -> str:
    """The valid name closest to `name` (always one, so the message can always suggest something)."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    return close[0] if close else valid[0]


def coerce(name: str, raw: str, kind: Any) -> Any:
    """Decode one string value into `kind` (str, bool, int, float or list[str])."""
    decoded = _json_or_raw(raw)
    if kind is str:
        return decoded if isinstance(decoded, str) else raw
    if kind is bool:
        if isinstance(decoded, bool):
            return decoded
        text = str(decoded).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{name}={raw!r}: expected true or false")
    if kind is int:
        if isinstance(decoded, bool):
            raise ConfigError(f"{name}={raw!r}: expected an integer")
        if isinstance(decoded, int):
            return decoded
        if isinstance(decoded, float) and decoded.is_integer():
            return int(decoded)
        try:
            return int(str(decoded).strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            if isinstance(decoded, bool):
                raise ValueError
            number = float(decoded) if isinstance(decoded, (int, float)) else float(str(decoded).strip())
        except (ValueError, OverflowError):  # OverflowError: an integer too large for a float
            raise ConfigError(f"{name}={raw!r}: expected a number") from None
        if not math.isfinite(number):  # nan or inf would pass every range check and train a broken model
            raise ConfigError(f"{name}={raw!r}: expected a finite number")
        return number
    if typing.get_origin(kind) is tuple:  # tuple[str, ...]: a JSON list, a Python list repr, or "a,b"
        if isinstance(decoded, str):
            decoded = _python_literal_or(decoded)
        if isinstance(decoded, str):
            decoded = [part.strip() for part in decoded.split(",") if part.strip()]
        if not isinstance(decoded, (list, tuple)) or not all(isinstance(x, str) for x in decoded):
            raise ConfigError(f"{name}={raw!r}: expected a list of strings, e.g. q_proj,v_proj")
        return tuple(decoded)
    raise TypeError(f"unsupported config field type {kind!r} for {name}")


def from_strings(cls: type[T], raw: Mapping[str, str], what: str) -> T:
    """Build the frozen dataclass `cls` from a string map. `what` names the source in errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown {what} '{key}': did you mean '{nearest(key, fields)}'?")
        value = coerce(key, text, hints[key])
        choices = fields[key].metadata.get("choices")
        if choices is not None and isinstance(value, str):
            value = value.strip().lower()  # SDK v2 sends str(True) = "True" for a bool-like choice
        if choices is not None:
            if isinstance(value, tuple):  # a list of choices: each one must be valid
                value = tuple(item.strip().lower() for item in value)
            for item in value if isinstance(value, tuple) else (value,):
                if item not in choices:
                    raise ConfigError(
                        f"{what} {key}={_shown(value)} is not valid: did you mean '{nearest(str(item), choices)}'? "
                        f"(valid: {', '.join(choices)})"
                    )
        values[key] = value
    return cls(**values)


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else repr(value)


def describe(cls: type) -> list[dict[str, Any]]:
    """One row per field (name, type, default, choices, help) for docs and logs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        rows.append(
            {
                "name": f.name,
                "type": "list[str]" if typing.get_origin(kind) is tuple else kind.__name__,
                "default": f.default,
                "choices": f.metadata.get("choices"),
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


def _json_or_raw(raw: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return raw


def _python_literal_or(text: str) -> Any:
    """SDK v2's Estimator sends str(list), a Python repr: "['q_proj', 'v_proj']"."""
    if not text.strip().startswith(("[", "(")):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
