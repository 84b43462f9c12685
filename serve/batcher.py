"""Iteration-level (continuous) batching over one model, owned by the engine thread. Imports torch.

Every decode step runs one forward pass for all running sequences. New requests join between steps:
they are prefilled together, and their KV cache is left-padded to the running batch's length and
concatenated to it; finished sequences leave by index selection. Each sequence keeps its own
parameters (sampling warpers, seed, repetition penalty, stop sequences, max_new_tokens).

Left padding is safe because positions come from the attention mask (a row's position is its count of
real tokens), and the keys in the cache are already rotated, so shifting them in the cache changes
nothing but where the mask has to hide padding.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from container.model_dir import ADAPTER_DIR, ServingSpec, resolve_base
from serve.config import ServeConfig
from serve.errors import ValidationError
from serve.schemas import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    request: GenerateRequest
    prompt_ids: list[int]
    max_new_tokens: int
    emit: object  # callable(kind, payload): "token" events while running, then "done" with the result
    seed: int | None = None
    rng: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    prefix_offset: int = 0  # incremental detokenization: see _new_text
    read_offset: int = 0
    finish_reason: str | None = None
    cancelled: object = None  # callable() -> bool: the client went away


class Batcher:
    def __init__(self, config: ServeConfig, spec: ServingSpec):
        self.config = config
        self.spec = spec
        self.max_total_tokens = min(config.max_total_tokens or spec.max_total_tokens, spec.max_total_tokens)
        self.max_input_tokens = min(config.max_input_tokens or spec.max_input_tokens, self.max_total_tokens - 1)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = _pick_dtype(config.dtype, self.device)
        self._load()
        # Merging and trimming caches needs plain per-layer key/value tensors; sliding-window or other
        # layer types (Gemma 2/3, Mistral v0.1) are served one request at a time instead.
        layers = DynamicCache(config=self.model.config).layers
        self.max_batch_size = config.max_batch_size if all(type(layer) is DynamicLayer for layer in layers) else 1
        if self.max_batch_size != config.max_batch_size:
            log.warning("this model's KV cache is not plain per-layer tensors: serving one request at a time")
        self.seqs: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, cached length]: 1 real, 0 left padding
        self.last: torch.Tensor | None = None  # [batch]: the token each sequence feeds next

    # --- loading -----------------------------------------------------------------------------------
    def _load(self) -> None:
        model_dir = self.config.model_dir
        kwargs = {"dtype": self.dtype, "use_safetensors": True}
        if self.config.device_map:
            kwargs["device_map"] = self.config.device_map
        if self.config.quantize == "bitsandbytes":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=self.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.spec.weights == "adapter":  # merged once at load: no per-token adapter cost
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(resolve_base(self.spec.base_model), **kwargs)
            self.model = PeftModel.from_pretrained(base, str(model_dir / ADAPTER_DIR)).merge_and_unload()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        if "quantization_config" in kwargs:
            log.info("weights loaded in 4-bit nf4 (bitsandbytes)")
        if "quantization_config" not in kwargs and "device_map" not in kwargs:
            self.model.to(self.device)
        self.device = self.model.device  # inputs go where the first layers are
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    # --- admission ---------------------------------------------------------------------------------
    def prepare(self, request: GenerateRequest, emit, cancelled) -> Sequence:
        """Tokenize and check one request against the limits; ValidationError names what is wrong."""
        p = request.params
        ids = self._prompt_ids(request)
        if p.truncate is not None:
            ids = ids[-p.truncate:]
        max_new = p.max_new_tokens or min(self.spec.max_new_tokens, self.max_total_tokens - len(ids))
        if len(ids) > self.max_input_tokens:
            raise ValidationError(f"inputs must have less than {self.max_input_tokens} tokens. Given: {len(ids)}")
        if len(ids) + max_new > self.max_total_tokens:
            raise ValidationError(
                f"inputs tokens + max_new_tokens must be <= {self.max_total_tokens}. "
                f"Given: {len(ids)} inputs tokens and {max_new} max_new_tokens")
        seq = Sequence(request, ids, max_new, emit, cancelled=cancelled)
        if p.sampling:
            seq.seed = p.seed if p.seed is not None else random.randrange(2**63)
            seq.rng = torch.Generator(device=self.device).manual_seed(seq.seed)
        return seq

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.spec.chat_template_for_inputs and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": request.inputs}], add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.inputs)["input_ids"]

    @property
    def active(self) -> int:
        return len(self.seqs)

    # --- the two kinds of forward pass ---------------------------------------------------------------
    @torch.inference_mode()
    def add(self, new: list[Sequence]) -> None:
        """Prefill new sequences together and merge them into the running batch."""
        width = max(len(s.prompt_ids) for s in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, s in enumerate(new):
            ids[row, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[row, width - len(s.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=DynamicCache(config=self.model.config), use_cache=True)
        tokens, logprobs = self._choose(out.logits[:, -1, :], new)
        if not self.seqs:
            self.cache, self.mask, self.seqs = out.past_key_values, mask, list(new)
            self.last = tokens
        else:  # build the merged tensors first, then swap them in: a failure leaves the running batch intact
            length = max(self.mask.shape[1], width)
            merged = [(torch.cat([_pad_left(running.keys, length), _pad_left(joining.keys, length)]),
                       torch.cat([_pad_left(running.values, length), _pad_left(joining.values, length)]))
                      for running, joining in zip(self.cache.layers, out.past_key_values.layers)]
            mask = torch.cat([_pad_left(self.mask, length, dim=1), _pad_left(mask, length, dim=1)])
            last = torch.cat([self.last, tokens])
            for layer, (keys, values) in zip(self.cache.layers, merged):
                layer.keys, layer.values = keys, values
            self.mask, self.last = mask, last
            self.seqs += new
        self._accept(tokens[-len(new):], logprobs[-len(new):], new)
        self._drop_finished()

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every running sequence."""
        positions = self.mask.sum(-1, keepdim=True)  # a row's position = its count of real tokens
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        tokens, logprobs = self._choose(out.logits[:, -1, :], self.seqs)
        self.last = tokens
        self._accept(tokens, logprobs, self.seqs)
        self._drop_finished()

    def fail_all(self) -> list[Sequence]:
        failed, self.seqs, self.cache, self.mask, self.last = self.seqs, [], None, None, None
        return failed

    # --- per-sequence decisions ----------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token per row: greedy, or sampled with that row's warpers and generator."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        for row, s in enumerate(seqs):
            p = s.request.params
            if p.repetition_penalty not in (None, 1.0):
                seen = torch.tensor(s.prompt_ids + s.generated, device=logits.device).unique()
                scores = logits[row, seen]
                logits[row, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
                tokens[row] = logits[row].argmax()
            if s.rng is not None:
                tokens[row] = _sample(logits[row], p.temperature or 1.0, p.top_k, p.top_p, s.rng)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs

    def _accept(self, tokens: torch.Tensor, logprobs: torch.Tensor, seqs: list[Sequence]) -> None:
        for s, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist()):
            if s.cancelled():
                s.finish_reason = "cancelled"
                continue
            s.generated.append(token)
            if token in self.eos_ids:
                s.emit("token", {"id": token, "text": "", "logprob": logprob, "special": True})
                self._finish(s, "eos_token")
                continue
            delta = _new_text(self.tokenizer, s)
            s.text += delta
            s.emit("token", {"id": token, "text": delta, "logprob": logprob, "special": False})
            stop_end = _first_stop_end(s.text, len(delta), s.request.params.stop)
            if stop_end is not None:
                s.text = s.text[:stop_end]  # like TGI, the stop sequence stays in the text
                self._finish(s, "stop_sequence")
            elif len(s.generated) >= s.max_new_tokens:
                self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        s.emit("done", GenerateResult(s.text, reason, len(s.generated), len(s.prompt_ids), s.seed))

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.seqs) if s.finish_reason is None]
        if len(keep) == len(self.seqs):
            return
        if not keep:
            self.fail_all()
            return
        index = torch.tensor(keep)  # on the CPU: it indexes cache layers on every GPU a model spans
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.seqs = [self.seqs[i] for i in keep]
        padding = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        if padding:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, padding:], layer.values[:, :, padding:]
            self.mask = self.mask[:, padding:]


def _new_text(tokenizer, s: Sequence) -> str:
    """The text the newest token completes, decoding only a short window of recent tokens.

    Decoding the whole output at every step would cost O(length) per token. Instead two decodes start
    at the same token (prefix_offset), so a tokenizer's quirks at the start of a decode (a dropped
    leading space) cancel out: the new text is what the longer one adds. A trailing U+FFFD means a
    multi-byte character is still incomplete: wait for the next token.
    """
    decode = tokenizer.decode
    before = decode(s.generated[s.prefix_offset:s.read_offset], skip_special_tokens=True)
    after = decode(s.generated[s.prefix_offset:], skip_special_tokens=True)
    if len(after) <= len(before) or after.endswith("\ufffd"):
        return ""
    s.prefix_offset, s.read_offset = s.read_offset, len(s.generated)
    return after[len(before):]


def _first_stop_end(text: str, new: int, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence ends in text, looking only where the last `new` characters could
    have completed one (earlier text was searched on earlier steps)."""
    ends = []
    for stop in stops:
        start = max(0, len(text) - new - len(stop) + 1)
        found = text.find(stop, start)
        if found >= 0:
            ends.append(found + len(stop))
    return min(ends) if ends else None


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, rng) -> torch.Tensor:
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        remove = cumulative - torch.softmax(ordered, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu() if rng.device.type == "cpu" else probs, 1, generator=rng).to(logits.device)[0]


def _pad_left(tensor: torch.Tensor, length: int, dim: int = 2) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def _pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16
