"""/invocations request schemas, validated into typed requests (TGI's `GenerateRequest` and OpenAI's chat).

Routed on the body like TGI: `inputs` → TGI generate, `messages` → OpenAI chat completion.

Every parameter TGI's own clients send is accepted: `text-generation` sends all of them, most as null
or false. A parameter at its neutral value (null, false, 1.0) is accepted; a non-neutral value of one
this server does not implement (`typical_p`, `watermark`; OpenAI `tools`, `logit_bias`) is a 422 that
names it; an unknown name is a 422 with the nearest valid one, never silently ignored.

Differences from TGI, on purpose: `top_p: 1.0` is accepted (TGI answers 422), `stop_sequences` is an
alias of `stop`, `return_full_text` defaults to false (TGI's default is true for local models), and a
request without `parameters` decodes greedily like one with them (TGI samples in that one case).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from container.config import nearest
from serve.errors import Forbidden, ValidationError
from serve.grammars import Grammar, parse_grammar, parse_response_format

MODEL_NAME = "llm-twin"  # the served model's name in OpenAI's answers and /v1/models
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"  # inference components' adapter (LoRA) selection
# What OpenAI-style clients send as `model` when they mean "whatever this endpoint serves": ours, TGI's docs'
# "tgi", and the "dummy" that huggingface_hub's InferenceClient sends to a URL.
NEUTRAL_MODELS = (MODEL_NAME, "tgi", "dummy")
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5  # TGI's default limit
MAX_BEST_OF = 4  # TGI's default limit
_PARAMETERS = (
    "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty", "do_sample",
    "stop", "stop_sequences", "seed", "return_full_text", "details", "decoder_input_details", "truncate",
    "best_of", "top_n_tokens", "grammar", "adapter_id", "typical_p", "watermark",
)
_CHAT_FIELDS = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                "stream", "n", "frequency_penalty", "presence_penalty", "repetition_penalty", "stream_options", "user",
                "response_format", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "tool_prompt",
                "cache_salt")
_COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n",
                      "frequency_penalty", "presence_penalty", "stream_options", "user", "suffix", "logit_bias",
                      "logprobs", "echo", "cache_salt")
_CHAT_UNSUPPORTED = ("logit_bias", "tools", "tool_choice", "tool_prompt")
MAX_CACHE_SALT_CHARS, CACHE_SALT_FORBIDDEN = 128, frozenset("@/\\\x00")  # vLLM's OpenAI server's rules


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    do_sample: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    truncate: int | None = None
    best_of: int = 1  # TGI: generate this many and answer the most likely; OpenAI `n`: answer them all
    top_n_tokens: int = 0
    logprobs: bool = False  # OpenAI chat: per-token logprobs in the answer
    grammar: Grammar | None = None
    adapter_id: str | None = None

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
    model: str | None = None  # OpenAI's `model`: an adapter name, or the served model's own name
    completion: bool = False  # OpenAI's /v1/completions: the prompt is used as it is, with no chat template
    history: tuple[dict, ...] | None = None  # a session turn's earlier messages (serve/sessions.py); None: no session
    by_header: bool = False  # the adapter was named by SageMaker's adapter header, not by the body
    # vLLM's prefix-cache salt (its OpenAI server's `cache_salt`): prompts share cached blocks only with prompts
    # of the same salt. A session's turns are salted with the session (serve/sessions.py).
    cache_salt: str | None = None

    @property
    def conversation(self) -> list[dict] | None:
        """What the chat template is applied to: a session's earlier messages, then this request's (a TGI
        request's `inputs` is the next user turn); or the chat's messages; None for a prompt used as it is."""
        if self.history is None:
            return self.messages
        return [*self.history, *(self.messages or [{"role": "user", "content": self.inputs}])]


def parse_request(body: object, adapter_header: str | None = None) -> GenerateRequest:
    """Route on the body's keys, as TGI does: `messages` → chat, otherwise TGI generate. SageMaker's
    adapter header, when present, decides the adapter (bind_to_adapter_header)."""
    if isinstance(body, dict) and "messages" in body:
        if "inputs" in body:
            raise ValidationError("send TGI's 'inputs' or OpenAI chat's 'messages', not both")
        request = parse_chat(body)
    else:
        request = parse_generate(body)
    return bind_to_adapter_header(request, adapter_header)


def bind_to_adapter_header(request: GenerateRequest, adapter_header: str | None) -> GenerateRequest:
    """On an inference-component endpoint SageMaker sets the adapter header from the component the caller
    was allowed to invoke: it is the authority, and a body naming another adapter (TGI's adapter_id,
    OpenAI's model) is refused, never obeyed. Without the header the body chooses among LORA_ADAPTERS (a
    plain multi-LoRA endpoint, `docker run`), never a registered component (serve/adapters.py). The refusal
    names no other adapter, and says the same whether or not the named one exists."""
    if not adapter_header:
        return request
    named = request.params.adapter_id
    if named is not None and named != adapter_header:
        raise Forbidden(f"this request's adapter is set by SageMaker's {ADAPTER_HEADER} header: leave "
                        "parameters.adapter_id unset or give the same name")
    if request.model not in (None, adapter_header, *NEUTRAL_MODELS):
        raise Forbidden(f"this request's adapter is set by SageMaker's {ADAPTER_HEADER} header: leave 'model' "
                        f"unset, or give the same name or {MODEL_NAME!r}")
    return replace(request, params=replace(request.params, adapter_id=adapter_header), model=adapter_header,
                   by_header=True)


def parse_generate(body: object) -> GenerateRequest:
    if not isinstance(body, dict):
        raise ValidationError(f"request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if "messages" in unknown:
        raise ValidationError("TGI's generate takes 'inputs', not 'messages': a chat goes to /v1/chat/completions "
                              "or /invocations")
    if unknown:
        raise ValidationError(f"unknown field '{unknown[0]}': did you mean "
                              f"'{nearest(unknown[0], ('inputs', 'parameters', 'stream'))}'?")
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
    if params.best_of > 1:  # TGI's rules
        if not params.sampling:
            raise ValidationError("'best_of' > 1 needs sampling: set do_sample, temperature, top_k or top_p")
        if params.seed is not None:
            raise ValidationError("'seed' must not be set when 'best_of' > 1")
        if stream:
            raise ValidationError("'best_of' > 1 is not supported when 'stream' is true")
    if stream and params.decoder_input_details:
        raise ValidationError("'decoder_input_details' is not supported when 'stream' is true")
    return GenerateRequest(inputs=inputs, params=params, stream=stream)


def parse_chat(body: dict) -> GenerateRequest:
    """OpenAI chat completions. As in OpenAI's API, temperature defaults to 1 (sampling); 0 is greedy."""
    for key in body:
        if key not in _CHAT_FIELDS:
            raise ValidationError(f"unknown field '{key}': did you mean '{nearest(key, _CHAT_FIELDS)}'?")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationError("'messages' must be a non-empty array of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), (str, list)):
            raise ValidationError(f"messages[{i}] must be an object with a 'content' string or array of text parts")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValidationError(f"messages[{i}].role must be system, user or assistant, got {message.get('role')!r}")
    for key in _CHAT_UNSUPPORTED:
        if body.get(key) not in (None, [], {}, "none", ""):
            raise ValidationError(f"'{key}' is not supported by this server")
    values = {k: v for k, v in body.items() if v is not None}
    stream = _flag(body, "stream")
    if values.get("user") is not None and not isinstance(values["user"], str):
        raise ValidationError(f"'user' must be a string, got {_json_type(values['user'])}")
    options = values.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ValidationError("'stream_options' must be {\"include_usage\": true | false}")
    if options is not None and not stream:
        raise ValidationError("'stream_options' is only allowed when 'stream' is true")
    n = _number(values, "n", int, minimum=1, maximum=MAX_BEST_OF) or 1
    if stream and n > 1:
        raise ValidationError("'n' > 1 is not supported when 'stream' is true")
    logprobs = _bool(values, "logprobs")
    top_logprobs = _number(values, "top_logprobs", int, minimum=0, maximum=MAX_TOP_N_TOKENS) or 0
    if top_logprobs and not logprobs:
        raise ValidationError("'top_logprobs' needs 'logprobs': true")
    temperature = _number(values, "temperature", float, minimum=0.0, maximum=2.0)
    greedy = temperature == 0.0  # OpenAI: temperature 0 is greedy, whatever top_p says
    raw = {"max_new_tokens": values.get("max_completion_tokens", values.get("max_tokens")),
           "top_p": None if greedy else values.get("top_p"), "stop": values.get("stop"), "seed": values.get("seed"),
           "repetition_penalty": values.get("repetition_penalty"),
           "frequency_penalty": values.get("frequency_penalty"), "top_n_tokens": top_logprobs or None}
    if not greedy:
        raw.update(do_sample=True, temperature=temperature)
    params = _parse_params({k: v for k, v in raw.items() if v is not None})
    presence = _number(values, "presence_penalty", float, minimum=-2.0, maximum=2.0)
    params = _replace(params, best_of=n, logprobs=logprobs, presence_penalty=presence,
                      grammar=parse_response_format(values.get("response_format")))
    messages = [{"role": m["role"], "content": _text(i, m["content"])} for i, m in enumerate(messages)]
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    model = values.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationError(f"'model' must be a string, got {_json_type(model)}")
    salt = values.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ValidationError(f"'cache_salt' must be a string, got {_json_type(salt)}")
    if salt is not None and (not 0 < len(salt) <= MAX_CACHE_SALT_CHARS or CACHE_SALT_FORBIDDEN & set(salt)):
        raise ValidationError(f"'cache_salt' must be 1 to {MAX_CACHE_SALT_CHARS} characters, none of them '@', "
                              f"'/', '\\' or NUL (got {len(salt)} characters)")
    return GenerateRequest(inputs=last_user, params=params, stream=stream, messages=messages, model=model,
                           cache_salt=salt)


def _text(index: int, content: str | list) -> str:
    """A message's content: a string, or OpenAI's and TGI's array of parts, of which this server reads text
    parts only (joined by newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _json_type(part)
            raise ValidationError(f"messages[{index}].content: only text parts {{\"type\": \"text\", \"text\": "
                                  f"...}} are served by this text model, got {str(kind)[:40]!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_completion(body: object) -> GenerateRequest:
    """OpenAI completions (`/v1/completions`): a raw prompt, no chat template; temperature defaults to 1."""
    if not isinstance(body, dict):
        raise ValidationError(f"request body must be a JSON object, got {_json_type(body)}")
    for key in body:
        if key not in _COMPLETION_FIELDS:
            raise ValidationError(f"unknown field '{key}': did you mean '{nearest(key, _COMPLETION_FIELDS)}'?")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValidationError("'prompt' must be a non-empty string")
    for key in ("suffix", "logit_bias", "logprobs"):
        if body.get(key) not in (None, {}, 0):
            raise ValidationError(f"'{key}' is not supported by this server")
    if body.get("echo") not in (None, False):
        raise ValidationError("'echo' is not supported by this server")
    chat_like = {k: v for k, v in body.items() if k in _CHAT_FIELDS and k != "logprobs"}  # a number here: 0
    request = parse_chat({**chat_like, "messages": [{"role": "user", "content": prompt}]})
    return GenerateRequest(prompt, request.params, request.stream, None, request.model, completion=True,
                           cache_salt=request.cache_salt)


def _parse_params(raw: dict) -> GenerateParams:
    for key in raw:
        if key not in _PARAMETERS:
            raise ValidationError(f"unknown parameter '{key}': did you mean '{nearest(key, _PARAMETERS)}'?")
    values = {key: value for key, value in raw.items() if value is not None}
    if "stop" in values and "stop_sequences" in values:
        raise ValidationError("give 'stop' or its alias 'stop_sequences', not both")
    if values.get("typical_p", 1.0) != 1.0:
        raise ValidationError("parameter 'typical_p' is not supported by this server's engine (vLLM); leave it unset")
    if values.get("watermark", False) is not False:
        raise ValidationError("parameter 'watermark' is not supported by this server; leave it unset or false")
    stop = values.pop("stop", values.pop("stop_sequences", []))
    params = GenerateParams(
        max_new_tokens=_number(values, "max_new_tokens", int, minimum=1),
        temperature=_number(values, "temperature", float, above=0.0),
        top_p=_number(values, "top_p", float, above=0.0, maximum=1.0),
        top_k=_number(values, "top_k", int, minimum=1),
        repetition_penalty=_number(values, "repetition_penalty", float, above=0.0),
        frequency_penalty=_number(values, "frequency_penalty", float, minimum=-2.0, maximum=2.0),
        do_sample=_bool(values, "do_sample"),
        stop=_stop(stop),
        seed=_number(values, "seed", int, minimum=0, maximum=2**63 - 1),
        return_full_text=_bool(values, "return_full_text"),
        details=_bool(values, "details"),
        decoder_input_details=_bool(values, "decoder_input_details"),
        truncate=_number(values, "truncate", int, minimum=1),
        best_of=_number(values, "best_of", int, minimum=1, maximum=MAX_BEST_OF) or 1,
        top_n_tokens=_number(values, "top_n_tokens", int, minimum=0, maximum=MAX_TOP_N_TOKENS) or 0,
        grammar=parse_grammar(values.get("grammar")),
        adapter_id=_string(values, "adapter_id"),
    )
    return params


def _replace(params: GenerateParams, **changes) -> GenerateParams:
    return replace(params, **{k: v for k, v in changes.items() if v is not None})


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


def _string(values: dict, key: str) -> str | None:
    value = values.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValidationError(f"parameter '{key}' must be a non-empty string, got {value!r}")
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
class Sequence:
    """One generated sequence, as TGI's details describe it."""

    text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    tokens: list = field(default_factory=list)  # [{"id", "text", "logprob", "special"}] when asked for
    top_tokens: list | None = None  # per position, the top_n_tokens most likely


@dataclass(frozen=True)
class GenerateResult:
    """What the engine answers: the chosen sequence, the others (best_of / n), and the prompt's details."""

    best: Sequence
    input_tokens: int
    seed: int | None
    prefill: list = field(default_factory=list)  # [{"id", "text", "logprob"}] for decoder_input_details
    others: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0  # the prompt's tokens that vLLM's prefix cache held (OpenAI's usage reports them)

    @property
    def text(self) -> str:
        return self.best.text

    @property
    def finish_reason(self) -> str:
        return self.best.finish_reason

    @property
    def generated_tokens(self) -> int:
        return self.best.generated_tokens
