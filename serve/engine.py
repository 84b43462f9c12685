"""The vLLM engine: load, watch, generate. Nothing here knows HTTP or TGI's semantics (serve/translate.py).

One thread of the worker runs an asyncio loop that owns vLLM's AsyncLLM; vLLM's EngineCore runs in its
own process and does the scheduling, continuous batching, paged KV cache and prefix caching. HTTP threads
call `submit`: the request is admitted (serve/admission.py) and translated here, on the caller's thread,
so a bad prompt is a 422 before any engine work; then a coroutine goes to the loop and the caller reads
the ticket's events: "token" while it runs (streams only), then "done" with the result, or "error". The
engine thread imports vLLM and starts it, so the HTTP side answers /ping (503) within a second of starting.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import replace

from container.model_dir import ServingSpec
from serve import translate
from serve.adapters import Adapter, Adapters
from serve.admission import Admission, Ticket
from serve.config import ServeConfig
from serve.engine_args import engine_arguments, lora_slots, model_length
from serve.errors import BadRequest, Overloaded, ServeError, ValidationError
from serve.faults import WORKER_BOOT_ERROR
from serve.lora_cache import LoraCache, lora_request
from serve.schemas import GenerateParams, GenerateRequest

log = logging.getLogger(__name__)

ENGINE_WATCH_SECONDS = 1.0  # how often the engine loop looks whether vLLM's engine process is still there


class VllmEngine:
    def __init__(self, config: ServeConfig, spec: ServingSpec, adapters: Adapters, lora_rank: int):
        self.config = config
        self.spec = spec
        self.adapters = adapters
        self.lora_rank = lora_rank
        max_total_tokens = model_length(config, spec)
        max_input_tokens = min(config.max_input_tokens or spec.max_input_tokens, max_total_tokens - 1)
        self.limits = translate.Limits(max_input_tokens, max_total_tokens, spec.max_new_tokens)
        self.admission = Admission(config.max_concurrent_requests)
        self.dtype = config.dtype  # until vLLM has resolved "auto"
        self.device_type = "unknown"  # until vLLM has chosen its platform
        self.tokenizer = None
        self.special_ids: set[int] = set()
        self.llm = None
        self.loras = LoraCache(lora_slots(config, spec))  # the adapters in this worker's engine (serve/lora_cache.py)
        self._loop = asyncio.new_event_loop()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    @property
    def state(self) -> str:
        """"loading" until warmed; "failed" after a fatal fault or once vLLM's engine process has died."""
        if self.llm is not None and self.llm.errored:
            return "failed"
        return self.admission.state(self._ready.is_set())

    @property
    def capacity(self) -> int:
        return self.admission.limit

    @property
    def in_flight(self) -> int:
        return self.admission.admitted

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop vLLM's engine processes. What runs on the engine loop (vLLM's output handler, our watch, a
        request past the graceful timeout) is cancelled first: left running, the output handler finds its
        engine gone and logs an EngineDeadError traceback for a normal stop."""
        if self.llm is None:
            return
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(timeout=10)
            except (FutureTimeout, RuntimeError):  # a loop that cannot answer: the engine is stopped all the same
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        self.llm.shutdown()

    async def _cancel_tasks(self) -> None:
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- HTTP threads ------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        """Admit and start one request; Overloaded when no slot frees up within `wait` seconds."""
        ticket = self.admission.ticket(request, wait)
        try:
            plan = translate.plan(request, self.tokenizer, self.limits, self.spec.chat_template_for_inputs)
            adapter = self.adapters.for_request(request)  # the version registered now: it runs on it to its end
        except BaseException:
            ticket.close()
            raise
        self.admission.track(ticket)
        ticket.future = asyncio.run_coroutine_threadsafe(self._generate(ticket, plan, adapter), self._loop)
        return ticket

    def predict(self, data: object) -> object:
        raise BadRequest("this endpoint has no custom predict_fn")

    @contextmanager
    def load_adapter(self, adapter: Adapter):
        """A registration in this worker (serve/adapters.py Adapters.register): `adapter` is loaded, and pinned,
        when it asks to be, and held while its record is written; then older versions of its name that no
        request here uses are unloaded. A pin the engine cannot keep is refused."""
        pins = sum(1 for other in self.adapters.registered() if other.pin and other.name != adapter.name)
        if adapter.pin and pins + 1 > self.loras.slots - 1:
            raise ValidationError(f"pin: this endpoint keeps at most {self.loras.slots - 1} adapters pinned "
                                  f"(MAX_LORAS={self.loras.slots}, less one slot for all the others), and "
                                  f"{pins} are: unpin or unregister one, or redeploy with a larger MAX_LORAS")
        try:
            self._call(self.loras.begin_registration(adapter), "load the adapter (every adapter slot was in use)")
            yield
        finally:
            self._call(self.loras.end_registration(adapter, self.adapters.current()), "unload its older version")

    def unload_adapter(self, adapter: Adapter) -> None:
        """`adapter` was unregistered: unloaded now unless a request here still runs on it (then once it ends)."""
        self._call(self.loras.reconcile(self.adapters.current()), "unload the adapter")

    def loaded_adapters(self) -> dict[int, tuple[str, bool]]:
        """The adapters in this worker's engine now: version -> (name, pinned)."""
        return self._call(self.loras.loaded(), "list the adapters") if self.loras.slots else {}

    def _call(self, coroutine, what: str):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=self.config.timeout)
        except FutureTimeout:
            future.cancel()
            raise Overloaded(f"could not {what} within {self.config.timeout} s") from None
        except ServeError:
            raise
        except Exception as e:  # the engine itself failed (it died, or ran out of memory): the fault policy's
            raise self.admission.fault(e, f"could not {what}") from None

    def _answer(self, plan: translate.Plan, outputs: list):
        """A plain request's answer from its vLLM outputs (in the decode thread)."""
        sequences: dict[int, translate.SequenceOutput] = {}
        prefill: list = []
        cached = 0
        for out in outputs:
            cached = out.num_cached_tokens or cached
            if out.prompt_logprobs is not None and not prefill:
                prefill = translate.prefill(plan.prompt_ids, out.prompt_logprobs, self.tokenizer.decode)
            for output in out.outputs:
                sequence = sequences.setdefault(output.index, translate.SequenceOutput())
                translate.add_output(sequence, output, plan, self.special_ids, self.tokenizer.decode)
        return translate.result(plan, sequences, prefill, cached)

    # --- the engine loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._load())
        except asyncio.CancelledError:  # the worker stopped while the model loaded (shutdown)
            return
        except Exception:
            log.exception("loading the model from %s failed", self.config.model_dir)
            os._exit(WORKER_BOOT_ERROR)
        self._ready.set()
        self._loop.create_task(self._watch())
        self._loop.run_forever()

    async def _watch(self) -> None:
        """vLLM's engine process can die between requests (a CUDA fault in its model, the OOM killer):
        noticed here within a second, not at the next request. Adapters registered, replaced or unregistered
        through another worker are reconciled here as often (serve/lora_cache.py)."""
        while self.admission.failure is None:
            if self.llm is not None and self.llm.errored:
                self.admission.fail("the vLLM engine process is gone")
            elif self.loras.slots:
                try:
                    await self.loras.reconcile(await self._loop.run_in_executor(None, self.adapters.current))
                except Exception as e:  # a registry being written, an engine going: the next round tries again
                    log.warning("reconciling adapters failed: %s: %s", type(e).__name__, e)
            await asyncio.sleep(ENGINE_WATCH_SECONDS)

    async def _load(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir,
                                                       trust_remote_code=self.config.trust_remote_code)
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.limits = replace(self.limits, max_token_chars=translate.longest_token(self.tokenizer))
        arguments, environment = engine_arguments(self.config, self.spec, self.lora_rank)
        os.environ.update(environment)  # read by vLLM's engine processes, which inherit it
        log.info("starting vLLM: %s", json.dumps(arguments, default=str))
        # As `vllm serve` builds its engine: vLLM picks the batch limits an API server gets (on an H100 1024
        # sequences and 8192 batched tokens; its engine default is 128 and 2048), unless MAX_BATCH_* set them.
        self.llm = self.loras.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments),
                                                              usage_context=UsageContext.OPENAI_API_SERVER)
        self.dtype = str(self.llm.model_config.dtype)
        self.device_type = self.llm.vllm_config.device_config.device_type  # "cuda" or "cpu", TGI's /info values
        warmup = GenerateRequest("Hello", GenerateParams(max_new_tokens=2))
        ticket = Ticket(warmup, lambda succeeded: None)
        plan = translate.plan(warmup, self.tokenizer, self.limits, self.spec.chat_template_for_inputs)
        await self._generate(ticket, plan, self.adapters.for_request(warmup))
        ticket.result(timeout=1)  # raises what the warm-up generation raised
        # What is loaded now lives as long as the worker: frozen out of the collector's reach, so that a full
        # collection stops walking it. Unfrozen, one paused every thread of the worker, the main loop answering
        # /ping too, for 334 ms under 32 clients (0.9 ms frozen); vLLM's own server freezes its heap as well.
        gc.collect()
        gc.freeze()
        scheduler = self.llm.vllm_config.scheduler_config
        log.info("model ready: vLLM engine on %s, max length %d, batches of up to %d sequences and %d tokens, "
                 "adapters: %s; %d objects frozen", arguments["model"], self.limits.max_total_tokens,
                 scheduler.max_num_seqs, scheduler.max_num_batched_tokens, ", ".join(self.adapters.fixed) or "none",
                 gc.get_freeze_count())

    async def _generate(self, ticket: Ticket, plan: translate.Plan, adapter: Adapter | None) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        sequences: dict[int, translate.SequenceOutput] = {}
        outputs = []  # a plain request's: its final output, turned into the answer off this loop
        prompt = TokensPrompt(prompt_token_ids=plan.prompt_ids)
        if plan.cache_salt:
            prompt["cache_salt"] = plan.cache_salt
        cached = 0
        try:
            async with self.loras.use(adapter):  # its slot, held to the end; a version that cannot load is a 422
                async for out in self.llm.generate(prompt, plan.sampling, uuid.uuid4().hex,
                                                   lora_request=lora_request(adapter)):
                    cached = out.num_cached_tokens or cached
                    if not plan.stream:
                        outputs.append(out)
                        continue
                    for output in out.outputs:  # a stream's delta: a few tokens, decoded here as they come
                        sequence = sequences.setdefault(output.index, translate.SequenceOutput())
                        for event in translate.add_output(sequence, output, plan, self.special_ids,
                                                          self.tokenizer.decode):
                            ticket.emit("token", event)
            if plan.stream:
                answer = translate.result(plan, sequences, [], cached)
            elif plan.wants_tokens or plan.sampling.prompt_logprobs is not None:  # every token decoded: not on
                answer = await self._loop.run_in_executor(self._decoder, self._answer, plan, outputs)  # this loop
            else:  # vLLM's text as it is: built here, without the two thread hand-offs of the decode thread
                answer = self._answer(plan, outputs)
        except VLLMClientError as e:  # e.g. a grammar vLLM cannot compile
            ticket.emit("error", ValidationError(str(e)))
        except ServeError as e:  # the engine ended or dropped the request
            ticket.emit("error", e)
        except Exception as e:  # the fault policy decides what else it ends (serve/faults.py)
            ticket.emit("error", self.admission.fault(e, "the request failed during generation"))
        else:
            ticket.emit("done", answer)
