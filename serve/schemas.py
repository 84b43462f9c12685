"""/invocations request schemas, validated into typed requests (reference/serving.md §1.4).

Routed on the body like TGI: `inputs` → TGI generate, `messages` → OpenAI chat completion.

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
    "stop", "stop_sequences", "seed", "return_full_text", "details", "truncate",
)
_CHAT_FIELDS = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                "stream", "n", "frequency_penalty", "presence_penalty", "stream_options", "user")


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
    truncate: int | None = None

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
    inputs: str  # TGI's prompt; for chat requests, the last user message (for logs)
    params: GenerateParams
    stream: bool = False
    messages: list[dict] | None = None  # set for OpenAI chat requests: the chat template is applied to them


def parse_request(body: object) -> GenerateRequest:
    """Route on the body's keys, as TGI does: `messages` → chat, otherwise TGI generate."""
    if isinstance(body, dict) and "messages" in body:
        return parse_chat(body)
    return parse_generate(body)


def parse_generate(body: object) -> GenerateRequest:
    if not isinstance(body, dict):
        raise ValidationError(f"request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if unknown:
        raise ValidationError(f"unknown field '{unknown[0]}': did you mean '{nearest(unknown[0], ('inputs', 'parameters', 'stream', 'messages'))}'?")
    if "inputs" not in body:
        raise ValidationError("missing field 'inputs' (the prompt string), or 'messages' for a chat completion")
    inputs = body["inputs"]
    if not isinstance(inputs, str):
        raise ValidationError(f"'inputs' must be a string, got {_json_type(inputs)}")
    if not inputs.strip():
        raise ValidationError("'inputs' cannot be empty")
    raw = body.get("parameters")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValidationError(f"'parameters' must be an object, got {_json_type(raw)}")
    params = _parse_params(raw)
    stream = _flag(body, "stream")
    return GenerateRequest(inputs=inputs, params=params, stream=stream)


def parse_chat(body: dict) -> GenerateRequest:
    """OpenAI chat completions. As in OpenAI's API, temperature defaults to 1 (sampling); 0 is greedy."""
    for key in body:
        if key not in _CHAT_FIELDS:
            raise ValidationError(f"unknown field '{key}': did you mean '{nearest(key, _CHAT_FIELDS)}'?")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValidationError("'messages' must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValidationError(f"messages[{i}] must be an object with a string 'content'")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValidationError(f"messages[{i}].role must be system, user or assistant, got {message.get('role')!r}")
    if body.get("n", 1) != 1:
        raise ValidationError("'n' must be 1: one choice per request")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ValidationError(f"'{key}' is not supported; use TGI's repetition_penalty through 'inputs' requests")
    values = {k: v for k, v in body.items() if v is not None}
    max_tokens = values.get("max_completion_tokens", values.get("max_tokens"))
    temperature = _number(values, "temperature", float, minimum=0.0, maximum=2.0)
    raw = {"max_new_tokens": max_tokens, "top_p": values.get("top_p"), "stop": values.get("stop"),
           "seed": values.get("seed")}
    if temperature != 0.0:
        raw.update(do_sample=True, temperature=temperature)
    params = _parse_params({k: v for k, v in raw.items() if v is not None})
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return GenerateRequest(inputs=last_user, params=params, stream=_flag(body, "stream"), messages=messages)


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
        truncate=_number(values, "truncate", int, minimum=1),
    )
    return params


def _number(values: dict, key: str, kind: type, minimum=None, maximum=None, above=None):
    if key not in values:
        return None
    value = values[key]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or (kind is int and not (isinstance(value, int) or float(value).is_integer())):
        raise ValidationError(f"parameter '{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    try:
        value = kind(value)
    except OverflowError:
        raise ValidationError(f"parameter '{key}' is out of range: {value!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValidationError(f"parameter '{key}' must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValidationError(f"parameter '{key}' must be >= {minimum}, got {value}")
    if above is not None and value <= above:
        raise ValidationError(f"parameter '{key}' must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ValidationError(f"parameter '{key}' must be <= {maximum}, got {value}")
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"'{key}' must be true or false, got {value!r}")
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
