"""The engine: vLLM's AsyncLLM inside the gunicorn worker. Nothing here knows HTTP.

One thread of the worker runs an asyncio loop that owns the AsyncLLM; vLLM's EngineCore runs in its own
process and does the scheduling, continuous batching, paged KV cache and prefix caching. HTTP threads
turn a request into token ids and SamplingParams here (so a bad prompt is a 422 before any engine work),
hand a coroutine to the loop, and read events from the request's queue: "token" events while it runs
(streams only), then "done" with the result, or "error". The engine thread imports vLLM and starts the
engine itself, so the HTTP side answers /ping (503) within a second of starting.

TGI's semantics are the edge's, applied on vLLM's SamplingParams: stop sequences stay in the text, and
the streamed token texts are the engine's text deltas, so they always add up to the final text.

Backpressure and faults (serve/admission.py): at most `max_concurrent_requests` requests are admitted at
once; the next one is refused at once (429) rather than queued without bound, unless its caller chose to
wait (a jsonlines batch). Failures during generation go through the fault policy there.

With custom code (serve/custom.py) that brings its own predict_fn, no vLLM engine starts: the engine
holds what model_fn returns (or a plain transformers model and tokenizer) and runs predict_fn on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable

from container.model_dir import ADAPTER_DIR, ServingSpec, resolve_base
from serve.adapters import AdapterRegistry
from serve.config import ServeConfig
from serve.custom import CustomHandlers
from serve.admission import Admission, Ticket
from serve.engine_args import engine_arguments, model_length
from serve.errors import BadRequest, GenerationError, NotFound, ServeError, ValidationError
from serve.schemas import GenerateParams, GenerateRequest, GenerateResult, Sequence

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = 3  # gunicorn stops the whole server when a worker exits with this code
ENGINE_WATCH_SECONDS = 1.0  # how often the engine loop looks whether vLLM's engine process is still there

MODEL_ADAPTER = "model"  # the name of an adapter-only model directory's own adapter


@dataclass
class _Job:
    """A request made ready for vLLM: prompt token ids, sampling parameters, adapter."""

    prompt_ids: list[int]
    sampling: object  # vllm.SamplingParams
    lora: object  # vllm LoRARequest or None
    seed: int | None
    pick_best: bool  # TGI best_of: answer the most likely of n; OpenAI n: answer all
    wants_tokens: bool  # per-token texts are computed only when the answer shows them
    stream: bool


@dataclass
class _Accumulator:
    """One sequence's output, gathered from vLLM's deltas (or its one final output)."""

    text: str = ""
    tokens: list = field(default_factory=list)
    top_tokens: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None


class Engine:
    def __init__(self, config: ServeConfig, spec: ServingSpec, custom: CustomHandlers | None = None):
        self.config = config
        self.spec = spec
        self.custom = custom
        self.model = None  # what a custom predict_fn receives
        self.tokenizer = None
        self.adapters: dict[str, object] = {}  # name -> LoRARequest, from LORA_ADAPTERS
        self.registry = AdapterRegistry(config.adapter_registry) if config.enable_lora and config.adapter_registry else None
        self.max_lora_rank = 0  # the engine's, once started with LoRA
        self.special_ids: set[int] = set()
        self.llm = None
        self.max_total_tokens = model_length(config, spec)
        self.max_input_tokens = min(config.max_input_tokens or spec.max_input_tokens, self.max_total_tokens - 1)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.admission = Admission(config.max_concurrent_requests)
        self._predict_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def healthy(self) -> bool:
        """False after a fatal fault or once vLLM's engine process has died: /ping fails."""
        return self.admission.failure is None and (self.llm is None or not self.llm.errored)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()

    # --- HTTP threads ------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        """Admit and start one request; Overloaded when no slot frees up within `wait` seconds."""
        ticket = self.admission.ticket(request, wait)
        try:
            job = self._prepare(request)
        except BaseException:
            ticket.close()
            raise
        self.admission.track(ticket)
        ticket.future = asyncio.run_coroutine_threadsafe(self._generate(ticket, job), self._loop)
        return ticket

    def run_job(self, function: Callable):
        """Run a custom predict_fn on the custom model, one call at a time."""
        self.admission.acquire()
        try:
            if not self._predict_lock.acquire(timeout=self.config.timeout):
                raise TimeoutError("predict_fn did not get the model within the server timeout")
            try:
                return function(self.model)
            except Exception as e:  # a custom predict_fn: the fault policy decides what its failure ends
                raise self.admission.fault(e, "predict_fn failed") from None
            finally:
                self._predict_lock.release()
        finally:
            self.admission.release()

    def _prepare(self, request: GenerateRequest) -> _Job:
        """Tokenize and check one request against the limits; ValidationError names what is wrong."""
        from vllm.exceptions import VLLMClientError

        p = request.params
        try:
            ids = self._prompt_ids(request)
        except ServeError:
            raise
        except Exception as e:  # e.g. jinja's TemplateError: "roles must alternate"
            raise ValidationError(f"the prompt could not be built: {type(e).__name__}: {e}") from None
        max_new = p.max_new_tokens or min(self.spec.max_new_tokens, self.max_total_tokens - len(ids))
        if len(ids) > self.max_input_tokens:
            raise ValidationError(f"inputs must have less than {self.max_input_tokens} tokens. Given: {len(ids)}")
        if len(ids) + max_new > self.max_total_tokens:
            raise ValidationError(
                f"inputs tokens + max_new_tokens must be <= {self.max_total_tokens}. "
                f"Given: {len(ids)} inputs tokens and {max_new} max_new_tokens")
        seed = (p.seed if p.seed is not None else random.randrange(2**63)) if p.sampling and p.best_of == 1 else p.seed
        try:
            params = _sampling_params(request, max_new, seed)
        except VLLMClientError as e:  # what vLLM itself refuses, e.g. n > 1 with greedy decoding
            raise ValidationError(str(e)) from None
        return _Job(ids, params, self._adapter(request), seed if p.best_of == 1 else None,
                    pick_best=p.best_of > 1 and request.messages is None and not request.completion,
                    wants_tokens=p.details or p.logprobs, stream=request.stream)

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.messages is not None:
            text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        inputs = request.inputs
        truncate = request.params.truncate
        if truncate is not None:  # TGI: keep the last `truncate` tokens of the inputs, before any template
            ids = tokenizer(inputs, add_special_tokens=False)["input_ids"]
            if len(ids) > truncate:
                inputs = tokenizer.decode(ids[-truncate:])
        if self.spec.chat_template_for_inputs and tokenizer.chat_template and not request.completion:
            text = tokenizer.apply_chat_template([{"role": "user", "content": inputs}], add_generation_prompt=True,
                                                 tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(inputs)["input_ids"]

    def _adapter(self, request: GenerateRequest):
        """The LoRA adapter a request asks for (TGI's adapter_id, OpenAI's model, SageMaker's adapter
        header), or the model directory's own adapter, or none."""
        name = request.params.adapter_id
        if name is None and request.model and (request.model in self.adapters or self._registered(request.model)):
            name = request.model
        if name is None:
            return self.adapters.get(MODEL_ADAPTER)
        adapter = self.adapters.get(name) or self._registered(name)
        if adapter is None:
            known = ", ".join(self.adapter_names()) or "none: this endpoint serves no adapters"
            raise ValidationError(f"unknown adapter {name!r}; known adapters: {known}")
        return adapter

    def adapter_names(self) -> list[str]:
        """Every adapter a request may name: LORA_ADAPTERS and those registered since the start."""
        registered = self.registry.names() if self.registry is not None else []
        return sorted(set(self.adapters) | set(registered))

    def _registered(self, name: str):
        """A registered adapter as vLLM's LoRARequest (vLLM loads it on first use), or None."""
        entry = self.registry.lookup(name) if self.registry is not None and name not in self.adapters else None
        if entry is None:
            return None
        from vllm.lora.request import LoRARequest

        folder, number = entry
        return LoRARequest(name, number, str(folder))

    def register_adapter(self, name: str, src: str) -> dict:
        """SageMaker's adapter component arriving: check it, record it for every worker, and load it into this
        worker's engine now, so an adapter vLLM cannot load fails here rather than on a user's request."""
        if self.registry is None or self.llm is None:
            raise BadRequest("this endpoint cannot take adapters: it was started without ENABLE_LORA=true (set it "
                             "on the base model; `launch deploy --adapter` does), or a custom predict_fn serves it")
        if name in self.adapters:
            raise BadRequest(f"adapter {name!r} is already served from LORA_ADAPTERS")
        from vllm.lora.request import LoRARequest

        folder, number = self.registry.check(name, src, self.max_lora_rank)
        try:  # loaded here first: other workers only ever see an adapter that loaded
            asyncio.run_coroutine_threadsafe(self.llm.add_lora(LoRARequest(name, number, str(folder))),
                                             self._loop).result(timeout=self.config.timeout)
        except Exception as e:
            raise ValidationError(f"adapter {name!r} from {folder} could not be loaded onto the base model: "
                                  f"{type(e).__name__}: {e}") from None
        self.registry.record(name, folder, number)
        log.info("adapter %s registered from %s", name, folder)
        return {"name": name, "src": str(folder)}

    def unregister_adapter(self, name: str) -> None:
        if self.registry is None or self.llm is None:
            raise NotFound(f"adapter {name!r} is not registered: this endpoint takes no adapters (ENABLE_LORA)")
        number = self.registry.unregister(name)
        asyncio.run_coroutine_threadsafe(self.llm.remove_lora(number), self._loop).result(timeout=self.config.timeout)
        log.info("adapter %s unregistered", name)

    # --- the engine loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._load())
        except Exception:
            log.exception("loading the model from %s failed", self.config.model_dir)
            os._exit(WORKER_BOOT_ERROR)
        self._ready.set()
        self._loop.create_task(self._watch())
        self._loop.run_forever()

    async def _watch(self) -> None:
        """vLLM's engine process can die between requests (a CUDA fault in its model, the OOM killer):
        noticed here within a second, not at the next request."""
        while self.admission.failure is None:
            if self.llm is not None and self.llm.errored:
                self.admission.fail("the vLLM engine process is gone")
            await asyncio.sleep(ENGINE_WATCH_SECONDS)

    async def _load(self) -> None:
        if self.custom is not None and "predict_fn" in self.custom:
            self.model = self._load_custom_model()
            return
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir, trust_remote_code=self.config.trust_remote_code)
        self.special_ids = set(self.tokenizer.all_special_ids)
        arguments, environment = engine_arguments(self.config, self.spec)
        os.environ.update(environment)  # read by vLLM's engine processes, which inherit it
        log.info("starting vLLM: %s", json.dumps(arguments, default=str))
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))
        self.adapters = self._lora_requests(arguments.get("enable_lora", False))
        self.max_lora_rank = arguments.get("max_lora_rank", 0)
        warmup = Ticket(GenerateRequest("Hello", GenerateParams(max_new_tokens=2)), lambda: None)
        await self._generate(warmup, self._prepare(warmup.request))
        warmup.result(timeout=1)  # raises what the warm-up generation raised
        log.info("model ready: vLLM engine on %s, max length %d, adapters: %s", arguments["model"],
                 self.max_total_tokens, ", ".join(self.adapters) or "none")

    def _lora_requests(self, enabled: bool) -> dict:
        if not enabled:
            return {}
        from vllm.lora.request import LoRARequest

        paths = dict(self.config.adapters)
        if self.spec.weights == "adapter":
            paths[MODEL_ADAPTER] = str(self.config.model_dir / ADAPTER_DIR)
        return {name: LoRARequest(name, number, path) for number, (name, path) in enumerate(sorted(paths.items()), 1)}

    def _load_custom_model(self):
        if "model_fn" in self.custom:
            model = self.custom["model_fn"](str(self.config.model_dir))
            log.info("model ready from %s's model_fn", self.custom.path)
            return model
        from transformers import AutoModelForCausalLM, AutoTokenizer  # plain transformers, for predict_fn only

        tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir, trust_remote_code=self.config.trust_remote_code)
        source = resolve_base(self.spec.base_model) if self.spec.weights == "adapter" else self.config.model_dir
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=True,
                                                     trust_remote_code=self.config.trust_remote_code)
        if self.spec.weights == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.config.model_dir / ADAPTER_DIR)).merge_and_unload()
        log.info("model ready for %s's predict_fn (transformers)", self.custom.path)
        return {"model": model.eval(), "tokenizer": tokenizer}

    async def _generate(self, ticket: Ticket, job: _Job) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        sequences: dict[int, _Accumulator] = {}
        prefill: list = []
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=job.prompt_ids), job.sampling,
                                               uuid.uuid4().hex, lora_request=job.lora):
                if out.prompt_logprobs is not None and not prefill:
                    prefill = self._prefill(job.prompt_ids, out.prompt_logprobs)
                for output in out.outputs:
                    new = self._accumulate(sequences.setdefault(output.index, _Accumulator()), output, job)
                    if job.stream:
                        for event in new:
                            ticket.emit("token", event)
        except VLLMClientError as e:  # e.g. a grammar vLLM cannot compile
            ticket.emit("error", ValidationError(str(e)))
            return
        except Exception as e:
            ticket.emit("error", self.admission.fault(e, "the request failed during generation"))
            return
        done = [sequences[i] for i in sorted(sequences)]
        if any(s.finish_reason is None for s in done):
            ticket.emit("error", GenerationError("the engine aborted the request"))
            return
        if job.pick_best:
            done.sort(key=lambda s: s.cumulative_logprob, reverse=True)
        results = [Sequence(s.text, s.finish_reason, len(s.tokens), s.tokens, s.top_tokens or None) for s in done]
        ticket.emit("done", GenerateResult(results[0], len(job.prompt_ids), job.seed, prefill, results[1:]))

    def _accumulate(self, seq: _Accumulator, output, job: _Job) -> list[dict]:
        """Add one vLLM output (a delta when streaming, everything otherwise) and return its new tokens as
        stream events. A delta can carry several tokens but one text: the text goes on its last token that
        is not special, so the streamed texts add up to the final text exactly, stop sequence included."""
        ids = list(output.token_ids)
        logprobs = output.logprobs or [None] * len(ids)
        top_n = job.sampling.logprobs or 0  # 0: only the chosen token's logprob was asked for
        carrier = max((i for i, token_id in enumerate(ids) if token_id not in self.special_ids), default=len(ids) - 1)
        events = []
        for position, (token_id, entry) in enumerate(zip(ids, logprobs)):
            chosen = entry.get(token_id) if entry else None
            special = token_id in self.special_ids
            token = {"id": token_id, "text": output.text if position == carrier else "",
                     "logprob": chosen.logprob if chosen is not None else None, "special": special}
            top = None
            if top_n and entry:
                top = [{"id": i, "text": lp.decoded_token or "", "logprob": lp.logprob, "special": i in self.special_ids}
                       for _, i, lp in sorted((lp.rank, i, lp) for i, lp in entry.items() if lp.rank <= top_n)]
                seq.top_tokens.append(top)
            seq.tokens.append(token)
            events.append({"token": token, "top_tokens": top})
        seq.text += output.text
        if output.cumulative_logprob is not None:
            seq.cumulative_logprob = output.cumulative_logprob
        if output.finish_reason is not None:
            seq.finish_reason = _finish_reason(output.finish_reason, output.stop_reason)
            if job.wants_tokens and not job.stream:
                ids = [t["id"] for t in seq.tokens]
                for token, text in zip(seq.tokens, token_texts(self.tokenizer.decode, ids, seq.text, job.prompt_ids[-4:])):
                    token["text"] = text
        return events

    def _prefill(self, prompt_ids: list[int], prompt_logprobs) -> list[dict]:
        """TGI's details.prefill: every prompt token with its logprob (the first has none)."""
        prefill = []
        for token_id, entry in zip(prompt_ids, prompt_logprobs):
            chosen = entry.get(token_id) if entry else None
            prefill.append({"id": token_id, "text": self.tokenizer.decode([token_id]),
                            "logprob": chosen.logprob if chosen is not None else None})
        return prefill


def token_texts(decode, ids: list[int], final: str, context: list[int] = ()) -> list[str]:
    """Each token's text, such that the texts add up to `final` (the engine's text, cut after a stop
    sequence). Incremental: two short decodes per token starting at the same token, so a tokenizer's
    quirks at the start of a decode cancel out; the last prompt tokens (`context`) start the first
    window, so a tokenizer that drops a leading space at the start of a decode (SentencePiece) keeps
    it, as the engine's text does. A trailing U+FFFD (a character still incomplete) waits for the next
    token."""
    ids = list(context) + list(ids)
    texts, prefix, read = [], 0, len(context)
    for end in range(len(context) + 1, len(ids) + 1):
        before = decode(ids[prefix:read], skip_special_tokens=True)
        after = decode(ids[prefix:end], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            texts.append(after[len(before):])
            prefix, read = read, end
        else:
            texts.append("")
    clipped, used = [], 0
    for text in texts:  # a stop sequence can end inside a token: cut the texts where `final` ends
        clipped.append(final[used:used + len(text)] if used < len(final) else "")
        used += len(clipped[-1])
    if used < len(final):
        clipped[-1] += final[used:]
    return clipped


def _sampling_params(request: GenerateRequest, max_new: int, seed: int | None):
    """TGI's (and OpenAI's) parameters as vLLM's SamplingParams."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    p = request.params
    sampling = p.sampling
    grammar = None
    if p.grammar is not None and p.grammar.kind == "regex":
        grammar = StructuredOutputsParams(regex=p.grammar.value)
    elif p.grammar is not None:
        grammar = StructuredOutputsParams(json=p.grammar.value) if p.grammar.value is not None \
            else StructuredOutputsParams(json_object=True)
    wants_logprobs = request.stream or p.details or p.best_of > 1 or p.logprobs
    return SamplingParams(
        n=p.best_of,
        temperature=(p.temperature or 1.0) if sampling else 0.0,
        top_p=(p.top_p or 1.0) if sampling else 1.0,
        top_k=(p.top_k or 0) if sampling else 0,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        presence_penalty=p.presence_penalty or 0.0,
        seed=seed,
        stop=list(p.stop) or None,
        include_stop_str_in_output=True,  # TGI keeps the stop sequence in the text
        max_tokens=max_new,
        logprobs=p.top_n_tokens if p.top_n_tokens else (0 if wants_logprobs else None),
        prompt_logprobs=0 if p.decoder_input_details else None,
        structured_outputs=grammar,
        output_kind=RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY,
    )


def _finish_reason(reason: str, stop_reason) -> str:
    """vLLM's finish reason in TGI's words: a stop string is TGI's stop_sequence; EOS or a stop token id is eos_token."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"
    raise GenerationError(f"the engine ended the request: {reason}")
