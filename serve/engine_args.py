"""vLLM's engine arguments from TGI's variables (serve/config.py), and the environment its CPU engine reads.

TGI's names mean what they mean in TGI: MAX_TOTAL_TOKENS is the model length, MAX_BATCH_PREFILL_TOKENS the
tokens scheduled per step, MAX_BATCH_TOTAL_TOKENS the KV cache (in tokens), MAX_BATCH_SIZE the sequences
run at once, NUM_SHARD the tensor-parallel GPUs, CUDA_MEMORY_FRACTION vLLM's GPU memory utilisation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from container.config import ConfigError
from container.cpu_features import cpu_dtype
from container.model_dir import ADAPTER_DIR, ServingSpec, kv_bytes_per_token, resolve_base
from serve.adapters import MODEL_ADAPTER, adapter_rank
from serve.config import LORA_RANKS, REGISTERED_LORA_RANK, REGISTERED_LORAS, ServeConfig

log = logging.getLogger(__name__)
CPU_KV_CACHE_SHARE = 0.25  # of the host's available memory, at most, when MAX_BATCH_TOTAL_TOKENS is unset


def model_length(config: ServeConfig, spec: ServingSpec) -> int:
    """MAX_TOTAL_TOKENS, never beyond what serving.json allows (0: neither says; vLLM takes the model's own)."""
    if not spec.max_total_tokens:
        return config.max_total_tokens
    return min(config.max_total_tokens or spec.max_total_tokens, spec.max_total_tokens)


def engine_arguments(config: ServeConfig, spec: ServingSpec, lora_rank: int) -> tuple[dict, dict]:
    """vLLM's AsyncEngineArgs from TGI's variables, and the environment its CPU engine reads. `lora_rank`:
    max_lora_rank(), computed once at start; 0 without adapters."""
    cpu = not _cuda_available()
    adapter_only = spec.weights == "adapter"
    max_total = model_length(config, spec)
    dtype = (cpu_dtype() if cpu else "auto") if config.dtype == "auto" else config.dtype
    arguments = {
        "model": resolve_base(spec.base_model) if adapter_only else str(config.model_dir),
        "tokenizer": str(config.model_dir),
        "served_model_name": "llm-twin",
        "dtype": dtype,
        "max_model_len": max_total or None,
        "enable_prefix_caching": config.prefix_caching,
        "enforce_eager": cpu or not config.cuda_graphs,  # no CUDA graphs on the CPU; and a 25 s start, not 2 min
        "trust_remote_code": config.trust_remote_code,  # off unless HF_MODEL_TRUST_REMOTE_CODE asks
        "load_format": "safetensors",
        "disable_log_stats": True,
        "seed": 0,
    }
    if adapter_only and spec.base_model_revision:  # a hub base: the commit the adapter was trained on, not main
        arguments["revision"] = spec.base_model_revision
    if not cpu:
        arguments["gpu_memory_utilization"] = config.cuda_memory_fraction
        arguments["tensor_parallel_size"] = config.num_shard or 1
    if config.max_batch_size:
        arguments["max_num_seqs"] = config.max_batch_size
    if config.max_batch_prefill_tokens:
        arguments["max_num_batched_tokens"] = config.max_batch_prefill_tokens
    model_config = os.path.join(arguments["model"], "config.json")
    if (config.max_batch_total_tokens or cpu) and os.path.isfile(model_config):  # else vLLM sizes it from GPU memory
        arguments["kv_cache_memory_bytes"] = kv_cache_bytes(model_config, config.max_batch_total_tokens, max_total,
                                                            config.max_batch_size, 4 if dtype == "float32" else 2,
                                                            shards=arguments.get("tensor_parallel_size", 1),
                                                            copies=config.engine_copies)
    elif config.max_batch_total_tokens:  # a hub base (an adapter-only twin): its config is not here before vLLM's
        log.warning("MAX_BATCH_TOTAL_TOKENS=%d is not applied: the base model %s is not a local folder, so its "
                    "per-token KV size is unknown before vLLM loads it; vLLM sizes the cache from memory",
                    config.max_batch_total_tokens, arguments["model"])
    if config.quantize:
        arguments["quantization"] = config.quantize
    if lora_wanted(config, spec):
        slots = lora_slots(config, spec)
        arguments.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots, max_lora_rank=lora_rank)
    environment = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}  # never fork a threaded gunicorn worker
    if cpu:  # vLLM's CPU engine keeps a core for the frontend by default: on 2 cores that cost 35% of its throughput
        environment["VLLM_CPU_NUM_OF_RESERVED_CPU"] = os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return arguments, environment


def lora_wanted(config: ServeConfig, spec: ServingSpec) -> bool:
    """Adapters may be served: LORA_ADAPTERS, ENABLE_LORA, or a model directory that holds only an adapter."""
    return bool(config.adapters) or config.enable_lora or spec.weights == "adapter"


def lora_slots(config: ServeConfig, spec: ServingSpec) -> int:
    """MAX_LORAS: the adapters one engine holds loaded at once, in vLLM's LRU cache (max_cpu_loras) and in
    its batches (max_loras), the same number so that a batch's adapters always fit the cache. Beyond it the
    least recently used adapter that is not pinned is evicted, and loaded again at its next request.
    Unset: as many as LORA_ADAPTERS, or REGISTERED_LORAS when adapters may be registered later; 0 without
    adapters."""
    if not lora_wanted(config, spec):
        return 0
    known = len(config.adapters) + (spec.weights == "adapter")
    return config.max_loras or max(known, REGISTERED_LORAS if config.enable_lora else 1)


def fixed_adapters(config: ServeConfig, spec: ServingSpec) -> dict[str, str]:
    """LORA_ADAPTERS, and an adapter-only model directory's own adapter (what a request naming none gets)."""
    own = {MODEL_ADAPTER: str(config.model_dir / ADAPTER_DIR)} if spec.weights == "adapter" else {}
    return {**config.adapters, **own}


def max_lora_rank(config: ServeConfig, spec: ServingSpec) -> int:
    """MAX_LORA_RANK, or the smallest rank vLLM accepts that holds every known adapter (and, when adapters may
    be registered later, REGISTERED_LORA_RANK). A known adapter above MAX_LORA_RANK is a ConfigError."""
    ranks = {folder: adapter_rank(folder) for folder in fixed_adapters(config, spec).values()}
    if config.max_lora_rank:
        too_large = {folder: r for folder, r in ranks.items() if r > config.max_lora_rank}
        if too_large:
            raise ConfigError(f"MAX_LORA_RANK={config.max_lora_rank} is below the rank of {', '.join(too_large)} "
                              f"({max(too_large.values())})")
        return config.max_lora_rank
    largest = max([*ranks.values(), REGISTERED_LORA_RANK if config.enable_lora else 0])
    return next(r for r in LORA_RANKS if r >= largest)


def kv_cache_bytes(model_config: str, total_tokens: int, max_total: int, max_seqs: int, element_bytes: int,
                   shards: int = 1, copies: int = 1) -> int:
    """KV cache size per GPU (vLLM's kv_cache_memory_bytes): MAX_BATCH_TOTAL_TOKENS when set (TGI's meaning:
    tokens the whole batch may hold); else, on the CPU, what a full batch of full-length sequences needs,
    capped at a share of the host's available memory. `element_bytes`: the cache holds the model's dtype, 2
    bytes or float32's 4. `shards`: tensor parallelism splits the KV heads over the GPUs (each keeps one at
    least). `copies`: the workers, each with its own engine, that share the host's memory (they load at once,
    each seeing the same free memory)."""
    with open(model_config, encoding="utf-8") as f:
        bytes_per_token = kv_bytes_per_token(json.load(f), element_bytes, shards)
    if total_tokens:
        return total_tokens * bytes_per_token
    wanted = (max_total or 4096) * (max_seqs or 256) * bytes_per_token
    return max(2**28, int(min(wanted, available_memory() * CPU_KV_CACHE_SHARE / max(1, copies))))


def available_memory() -> int:
    """Free memory, within the container's cgroup limit when it has one (an inference component's memory)."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",  # v1
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, used = (Path(name).read_text().strip() for name in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and used.isdigit():  # v2 says "max" when there is no limit
            return min(free, max(0, int(limit) - int(used)))
    return free


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
