"""TGI's /invocations request schema, validated into typed requests (reference/serving.md §1.4).

Differences from TGI, on purpose: `top_p: 1.0` is accepted (TGI answers 422), `stop_sequences` is an
alias of `stop`, `return_full_text` defaults to false (TGI's default is true for local models), and a
request without `parameters` decodes greedily like one with them (TGI samples in that one case).
Unknown parameters are rejected with the nearest valid name instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from container.config import nearest
from serve.errors import ValidationError

MAX_STOP_SEQUENCES = 4
_PARAMETERS = (
    "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample",
    "stop", "stop_sequences", "seed", "return_full_text", "details",
)


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_full_text: bool = False
    details: bool = False

    @property
    def sampling(self) -> bool:
        """TGI's rule: sampling is on when asked for or when any warper changes the distribution."""
        return (
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )


@dataclass(frozen=True)
class GenerateRequest:
    inputs: str
    params: GenerateParams


def parse_generate(body: object) -> GenerateRequest:
    if not isinstance(body, dict):
        raise ValidationError(f"request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if unknown:
        raise ValidationError(f"unknown field '{unknown[0]}': did you mean '{nearest(unknown[0], ('inputs', 'parameters', 'stream'))}'?")
    if "inputs" not in body:
        raise ValidationError("missing field 'inputs' (the prompt string)")
    inputs = body["inputs"]
    if not isinstance(inputs, str):
        raise ValidationError(f"'inputs' must be a string, got {_json_type(inputs)}")
    if not inputs.strip():
        raise ValidationError("'inputs' cannot be empty")
    if body.get("stream", False) not in (False, None):
        raise ValidationError("'stream': true is not supported by this server version; send stream false or omit it")
    raw = body.get("parameters")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValidationError(f"'parameters' must be an object, got {_json_type(raw)}")
    return GenerateRequest(inputs=inputs, params=_parse_params(raw))


def _parse_params(raw: dict) -> GenerateParams:
    for key in raw:
        if key not in _PARAMETERS:
            raise ValidationError(f"unknown parameter '{key}': did you mean '{nearest(key, _PARAMETERS)}'?")
    values = {key: value for key, value in raw.items() if value is not None}
    if "stop" in values and "stop_sequences" in values:
        raise ValidationError("give 'stop' or its alias 'stop_sequences', not both")
    stop = values.pop("stop", values.pop("stop_sequences", []))
    params = GenerateParams(
        max_new_tokens=_number(values, "max_new_tokens", int, minimum=1),
        temperature=_number(values, "temperature", float, above=0.0),
        top_p=_number(values, "top_p", float, above=0.0, maximum=1.0),
        top_k=_number(values, "top_k", int, minimum=1),
        repetition_penalty=_number(values, "repetition_penalty", float, above=0.0),
        do_sample=_bool(values, "do_sample"),
        stop=_stop(stop),
        seed=_number(values, "seed", int, minimum=0, maximum=2**64 - 1),
        return_full_text=_bool(values, "return_full_text"),
        details=_bool(values, "details"),
    )
    return params


def _number(values: dict, key: str, kind: type, minimum=None, maximum=None, above=None):
    if key not in values:
        return None
    value = values[key]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not (isinstance(value, int) or float(value).is_integer())):
        raise ValidationError(f"parameter '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValidationError(f"parameter '{key}' must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValidationError(f"parameter '{key}' must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValidationError(f"parameter '{key}' must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ValidationError(f"parameter '{key}' must be <= {maximum}, got {value}")
    return value


def _bool(values: dict, key: str) -> bool:
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"parameter '{key}' must be true or false, got {value!r}")
    return value


def _stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValidationError("parameter 'stop' must be a list of non-empty strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ValidationError(f"parameter 'stop' accepts at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}")
    return tuple(stop)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


@dataclass(frozen=True)
class GenerateResult:
    text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    input_tokens: int
    seed: int | None
