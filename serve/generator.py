"""The model owner: loads the model directory and runs generation with TGI's parameter semantics.

Used only from the engine thread (serve/engine.py), which is what makes it safe without locks.
"""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from container.model_dir import ADAPTER_DIR, ServingSpec, resolve_base
from serve.config import ServeConfig
from serve.errors import ValidationError
from serve.schemas import GenerateRequest, GenerateResult


class Generator:
    def __init__(self, config: ServeConfig, spec: ServingSpec):
        self.config = config
        self.spec = spec
        self._load()

    def _load(self) -> None:
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = _pick_dtype(self.config.dtype, self.device)
        model_dir = self.config.model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.spec.weights == "adapter":  # merged once at load: no per-token adapter cost
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(resolve_base(self.spec.base_model), dtype=self.dtype, use_safetensors=True)
            self.model = PeftModel.from_pretrained(base, str(model_dir / ADAPTER_DIR)).merge_and_unload()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True)
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def _prompt_ids(self, inputs: str) -> list[int]:
        if self.spec.chat_template_for_inputs and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": inputs}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(inputs)["input_ids"]

    @torch.inference_mode()
    def generate(self, request: GenerateRequest) -> GenerateResult:
        p = request.params
        ids = self._prompt_ids(request.inputs)
        max_new = p.max_new_tokens or self.spec.max_new_tokens
        if len(ids) > self.spec.max_input_tokens:
            raise ValidationError(f"inputs must have less than {self.spec.max_input_tokens} tokens. Given: {len(ids)}")
        if len(ids) + max_new > self.spec.max_total_tokens:
            raise ValidationError(
                f"inputs tokens + max_new_tokens must be <= {self.spec.max_total_tokens}. "
                f"Given: {len(ids)} inputs tokens and {max_new} max_new_tokens"
            )
        seed = None
        kwargs = {"max_new_tokens": max_new, "do_sample": p.sampling, "pad_token_id": self.pad_id,
                  "eos_token_id": sorted(self.eos_ids)}
        if p.sampling:
            seed = p.seed if p.seed is not None else random.randrange(2**63)
            torch.manual_seed(seed)
            kwargs.update(temperature=p.temperature or 1.0, top_p=p.top_p or 1.0, top_k=p.top_k or 0)
        if p.repetition_penalty is not None:
            kwargs["repetition_penalty"] = p.repetition_penalty
        if p.stop:
            kwargs.update(stop_strings=list(p.stop), tokenizer=self.tokenizer)

        input_ids = torch.tensor([ids], device=self.device)
        output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new_ids = output[0, len(ids):].tolist()
        text, finish_reason = self._finish(new_ids, p.stop, max_new)
        if p.return_full_text:
            text = request.inputs + text
        return GenerateResult(text, finish_reason, len(new_ids), len(ids), seed)

    def _finish(self, new_ids: list[int], stop: tuple[str, ...], max_new: int) -> tuple[str, str]:
        """Decoded text and TGI's finish_reason. Like TGI, a matched stop sequence stays in the text."""
        if new_ids and new_ids[-1] in self.eos_ids:
            return self.tokenizer.decode(new_ids[:-1], skip_special_tokens=True), "eos_token"
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        hits = [(text.find(s) + len(s), s) for s in stop if s in text]
        if hits:
            return text[: min(hits)[0]], "stop_sequence"
        # generate() stopped on a stop string whose text straddles what decode() shows, or on length
        return text, "length" if len(new_ids) >= max_new else "stop_sequence"


def _pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16
