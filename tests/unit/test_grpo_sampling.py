"""Where GRPO samples on a GPU (train/grpo.py's sampling_engine): the GPU is faked, the choice is real. The CPU
paths run for real in tests/contract/test_grpo.py."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from train.config import TrainConfig
from train.grpo import VLLM_HEADROOM_BYTES, kv_cache_bytes, sampling_engine


class Weights(torch.nn.Module):
    """An 8B model's bf16 weights (on the meta device: no memory) and its attention's shape."""

    def __init__(self, count: int, dtype=torch.bfloat16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(count, dtype=dtype, device="meta"))
        self.config = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                  hidden_size=4096)

    def get_output_embeddings(self):
        return None


@pytest.fixture
def gpu_of(monkeypatch):
    def gpu(gib: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=gib << 30))
    return gpu


def test_vllm_samples_beside_the_trained_model_only_where_both_fit_and_never_for_qlora(gpu_of):
    gpu_of(80)
    small = Weights(8 << 30)  # 16 GiB of bf16 weights, an 8B model
    engine, why, share = sampling_engine(TrainConfig(), small, "single")  # LoRA
    kv = kv_cache_bytes(TrainConfig(), small.config)
    assert kv == (2 * 8) * 2048 * (2 * 32 * 8 * 128 * 2)  # a step's prompts x max_length x bytes per token (1 GiB)
    assert engine == "vllm" and share == pytest.approx(((16 << 30) + kv + VLLM_HEADROOM_BYTES) / (80 << 30))
    assert why == f"colocate mode, {share:.0%} of the GPU"
    full = sampling_engine(TrainConfig(adapter="full"), small, "single")  # 8B x 16 bytes of optimizer state: no room
    assert full[0] == "transformers" and "do not fit beside the training" in full[1]
    assert sampling_engine(TrainConfig(adapter="qlora"), small, "single")[:2] == (
        "transformers", "QLoRA's 4-bit weights: vLLM 0.32 cannot load bitsandbytes")
    gpu_of(24)  # an A10G: two copies of 16 GiB do not fit
    engine, why, _ = sampling_engine(TrainConfig(), small, "single")
    assert engine == "transformers" and "do not fit beside the training (16.0 GiB) on a 24 GiB GPU" in why


def test_full_fine_tunings_fp32_weights_get_a_16_bit_vllm_copy(gpu_of):
    gpu_of(80)
    one_b = Weights(1 << 30, dtype=torch.float32)  # full fine-tuning's fp32 master weights (plan.weights_dtype)
    engine, _, share = sampling_engine(TrainConfig(adapter="full"), one_b, "single")
    vllm = (2 << 30) + kv_cache_bytes(TrainConfig(), one_b.config) + VLLM_HEADROOM_BYTES  # vLLM loads 16-bit
    assert engine == "vllm" and share == pytest.approx(vllm / (80 << 30))
    gpu_of(24)  # 18 GiB of weights, gradients, AdamW state and autocast's copies leave no room for vLLM
    assert sampling_engine(TrainConfig(adapter="full"), one_b, "single")[0] == "transformers"


def test_sharded_training_leaves_each_gpu_its_share(gpu_of, monkeypatch):
    gpu_of(80)
    eight_b = Weights(8 << 30)
    assert sampling_engine(TrainConfig(adapter="full"), eight_b, "single")[0] == "transformers"  # 144 GiB
    monkeypatch.setenv("WORLD_SIZE", "8")  # ZeRO-3 over 8 GPUs: 18 GiB each, beside vLLM's 19
    assert sampling_engine(TrainConfig(adapter="full"), eight_b, "zero3")[0] == "vllm"
