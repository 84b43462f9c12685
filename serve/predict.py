"""The engine for custom code that brings its own predict_fn (serve/custom.py): no vLLM starts.

The model is what code/inference.py's model_fn returns, or, without one, {"model": <transformers model>,
"tokenizer": <tokenizer>} loaded from the model directory (an adapter-only directory merged onto its
base). predict_fn runs on the HTTP thread, one call at a time, inside admission; its failures go through
the fault policy (serve/faults.py) like a generation's.
"""

from __future__ import annotations

import logging
import os
import threading

from container.model_dir import ADAPTER_DIR, ServingSpec, resolve_base
from serve.adapters import Adapter
from serve.admission import Admission, Ticket
from serve.config import ServeConfig
from serve.custom import CustomHandlers
from serve.errors import BadRequest
from serve.faults import WORKER_BOOT_ERROR
from serve.schemas import GenerateRequest
from serve.translate import Limits

log = logging.getLogger(__name__)



class PredictEngine:
    def __init__(self, config: ServeConfig, spec: ServingSpec, custom: CustomHandlers):
        self.config = config
        self.spec = spec
        self.custom = custom
        self.limits = Limits(spec.max_input_tokens, spec.max_total_tokens, spec.max_new_tokens)
        self.admission = Admission(config.max_concurrent_requests)
        self.model = None
        self.dtype = config.dtype  # a model_fn's model is the code's own: its type is not known here
        self.device_type = "unknown"  # nor its device
        self._ready = threading.Event()
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        return self.admission.state(self._ready.is_set())

    @property
    def capacity(self) -> int:
        return self.admission.limit

    @property
    def in_flight(self) -> int:
        return self.admission.admitted

    def start(self) -> None:
        threading.Thread(target=self._load, name="engine", daemon=True).start()

    def shutdown(self) -> None:
        pass

    def predict(self, data: object) -> object:
        """Run predict_fn on the model, one call at a time."""
        self.admission.acquire()
        succeeded = False
        try:
            if not self._lock.acquire(timeout=self.config.timeout):
                raise TimeoutError("predict_fn did not get the model within the server timeout")
            try:
                prediction = self.custom["predict_fn"](data, self.model)
                succeeded = True
                return prediction
            except Exception as e:  # a custom predict_fn: the fault policy decides what its failure ends
                raise self.admission.fault(e, "predict_fn failed") from None
            finally:
                self._lock.release()
        finally:
            self.admission.release(succeeded)

    def submit(self, request: GenerateRequest, wait: float = 0.0) -> Ticket:
        raise BadRequest(f"this endpoint serves {self.custom.path}'s predict_fn: send its requests to /invocations")

    def load_adapter(self, adapter: Adapter) -> None:
        raise BadRequest("this endpoint cannot take adapters: a custom predict_fn serves it")

    def unload_adapter(self, adapter: Adapter) -> None:
        raise BadRequest("this endpoint cannot take adapters: a custom predict_fn serves it")

    def loaded_adapters(self) -> dict[int, tuple[str, bool]]:
        return {}

    def _load(self) -> None:
        try:
            self.model = self._load_model()
        except Exception:
            log.exception("loading the model from %s failed", self.config.model_dir)
            os._exit(WORKER_BOOT_ERROR)
        self._ready.set()

    def _load_model(self):
        if "model_fn" in self.custom:
            model = self.custom["model_fn"](str(self.config.model_dir))
            log.info("model ready from %s's model_fn", self.custom.path)
            return model
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer  # plain transformers, for predict_fn only

        trust = self.config.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(self.config.model_dir, trust_remote_code=trust)
        adapter_only = self.spec.weights == "adapter"
        source = resolve_base(self.spec.base_model) if adapter_only else self.config.model_dir
        revision = self.spec.base_model_revision if adapter_only else None  # a hub base: its trained-on commit
        device = "cuda" if torch.cuda.is_available() else "cpu"  # as the toolkits' default model_fn: the GPU if any
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", use_safetensors=True, revision=revision,
                                                     device_map=device, trust_remote_code=trust)
        if adapter_only:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.config.model_dir / ADAPTER_DIR)).merge_and_unload()
        self.dtype = str(getattr(model, "dtype", self.dtype))  # a transformers model has one
        self.device_type = device
        log.info("model ready for %s's predict_fn (transformers)", self.custom.path)
        return {"model": model.eval(), "tokenizer": tokenizer}
