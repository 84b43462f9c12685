"""serve/engine.py's generation coroutine against a stand-in for vLLM's AsyncLLM: which thread does the
per-token decoding of a plain request's answer. (Real generation through vLLM is in tests/contract/.)"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from container.model_dir import ServingSpec
from serve.adapters import Adapters
from serve.admission import Ticket
from serve.config import ServeConfig
from serve.engine import VllmEngine
from serve.schemas import GenerateParams, GenerateRequest
from serve.translate import Plan


class Tokenizer:
    """Decodes token i as " t<i>", noting the thread each decode runs on."""

    def __init__(self):
        self.threads: set[str] = set()

    def decode(self, ids, skip_special_tokens=False):
        self.threads.add(threading.current_thread().name)
        return "".join(f" t{i}" for i in ids)


class FinalOutputLLM:
    """AsyncLLM.generate with RequestOutputKind.FINAL_ONLY: one output, every token and its logprob."""

    errored = False

    async def generate(self, prompt, sampling, request_id, lora_request=None):
        chosen = SimpleNamespace(logprob=-0.5, rank=1, decoded_token=None)
        completion = SimpleNamespace(index=0, token_ids=[7, 8, 9], text=" t7 t8 t9",
                                     logprobs=[{7: chosen}, {8: chosen}, {9: chosen}], cumulative_logprob=-1.5,
                                     finish_reason="length", stop_reason=None)
        yield SimpleNamespace(outputs=[completion], prompt_logprobs=[None, {2: chosen}, {3: chosen}],
                              num_cached_tokens=0)


def test_a_plain_requests_details_are_decoded_off_the_engine_loop(tmp_path):
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    engine = VllmEngine(config, ServingSpec(base_model="tiny", max_input_tokens=50, max_total_tokens=80),
                        Adapters({}), lora_rank=0)
    engine.tokenizer, engine.llm = Tokenizer(), FinalOutputLLM()
    loop_thread = threading.Thread(target=engine._loop.run_forever, name="engine", daemon=True)
    loop_thread.start()
    request = GenerateRequest("x", GenerateParams(details=True, decoder_input_details=True))
    plan = Plan([1, 2, 3], SimpleNamespace(logprobs=0), seed=None, pick_best=False, wants_tokens=True, stream=False)
    ticket = Ticket(request, lambda succeeded: None)
    asyncio.run_coroutine_threadsafe(engine._generate(ticket, plan, None), engine._loop).result(timeout=60)
    answer = ticket.result(timeout=60)
    engine._loop.call_soon_threadsafe(engine._loop.stop)
    assert [t["text"] for t in answer.best.tokens] == [" t7", " t8", " t9"]
    assert [t["text"] for t in answer.prefill] == [" t1", " t2", " t3"]
    assert engine.tokenizer.threads and "engine" not in engine.tokenizer.threads, engine.tokenizer.threads
