"""Constrained decoding's requests: TGI's `grammar` and a chat's `response_format`, checked and bounded.

Grammars are compiled by vLLM's structured-output backend before the first token, and its compile timeout
leaves the native thread running, so what it is given is bounded here first: the text's length, a schema's
depth, and every repetition count (a regex's {n,m}, a schema's minLength/maxItems/...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from serve.errors import ValidationError

MAX_GRAMMAR_CHARS = 16_384  # a regex pattern, or a JSON schema as JSON text
MAX_SCHEMA_DEPTH = 32
MAX_REPEAT = 1_000  # a regex {n,m}, and a schema's minLength/maxLength/minItems/maxItems/...Properties
_SCHEMA_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REGEX_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class Grammar:
    """TGI's `grammar` / OpenAI's `response_format`: constrained decoding through vLLM's structured outputs."""

    kind: str  # "json" (value: a JSON schema, or None for any JSON object) | "regex" (value: a pattern)
    value: object = None


def parse_grammar(raw: object) -> Grammar | None:
    """TGI's grammar: {"type": "json", "value": <JSON schema>} or {"type": "regex", "value": "<pattern>"}."""
    if raw is None:
        return None
    if (not isinstance(raw, dict) or raw.get("type") not in ("json", "json_object", "regex")
            or set(raw) - {"type", "value"}):
        raise ValidationError("parameter 'grammar' must be {\"type\": \"json\" | \"regex\", \"value\": ...}")
    value = raw.get("value")
    if raw["type"] == "regex":
        if not isinstance(value, str) or not value:
            raise ValidationError("a 'regex' grammar needs a non-empty pattern string as its 'value'")
        return Grammar("regex", _pattern(value))
    return Grammar("json", _schema(value))


def _pattern(pattern: str) -> str:
    if len(pattern) > MAX_GRAMMAR_CHARS:
        raise ValidationError(f"a 'regex' grammar may have at most {MAX_GRAMMAR_CHARS} characters, got {len(pattern)}")
    for match in _REGEX_COUNT.finditer(pattern):
        counts = [int(n) for n in match.groups() if n]
        if max(counts) > MAX_REPEAT:
            raise ValidationError(f"a 'regex' grammar may repeat at most {MAX_REPEAT} times, got {match.group(0)}")
    return pattern


def parse_response_format(raw: object) -> Grammar | None:
    """A chat's response_format, OpenAI's ({"type": "text" | "json_object"}, {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}}}) or TGI's (its grammar: {"type": "json" | "json_object" |
    "regex", "value": ...})."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text" and set(raw) == {"type"}:
        return None
    if kind in ("json", "json_object", "regex") and set(raw) <= {"type", "value"}:
        return parse_grammar(raw) if "value" in raw or kind == "regex" else Grammar("json", None)  # any JSON object
    if kind == "json_schema" and set(raw) == {"type", "json_schema"} and isinstance(raw["json_schema"], dict):
        return Grammar("json", _schema(raw["json_schema"].get("schema")))
    raise ValidationError("'response_format' must be {\"type\": \"text\" | \"json_object\"}, {\"type\": "
                          "\"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}, or TGI's {\"type\": "
                          "\"json\" | \"regex\", \"value\": ...}")


def _schema(value: object):
    if value is None or value == {}:
        return None  # any JSON object
    if isinstance(value, str):
        if len(value) > MAX_GRAMMAR_CHARS:
            raise ValidationError(f"a JSON schema may have at most {MAX_GRAMMAR_CHARS} characters, got {len(value)}")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            raise ValidationError(f"the JSON schema of 'grammar' is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise ValidationError("a 'json' grammar's value must be a JSON schema object")
    _check_schema_size(value)
    return value


def _check_schema_size(schema: dict) -> None:
    """Depth, total size and repetition counts, walked without recursion (a schema can nest deeply)."""
    if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
        raise ValidationError(f"a JSON schema may have at most {MAX_GRAMMAR_CHARS} characters as JSON")
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise ValidationError(f"a JSON schema may nest at most {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, dict):
            for key in _SCHEMA_COUNTS:
                count = node.get(key)
                if isinstance(count, (int, float)) and not isinstance(count, bool) and count > MAX_REPEAT:
                    raise ValidationError(f"a JSON schema's {key} may be at most {MAX_REPEAT}, got {count}")
            if isinstance(node.get("pattern"), str):
                _pattern(node["pattern"])
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
