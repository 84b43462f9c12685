"""Where GRPO samples on a GPU (train/grpo.py's sampling_engine): the GPU is faked, the choice is real. The CPU
paths run for real in tests/contract/test_grpo.py."""

from types import SimpleNamespace

import pytest
import torch

from train.config import TrainConfig
from train.grpo import sampling_engine


class Weights(torch.nn.Module):
    def __init__(self, count: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(count, dtype=torch.bfloat16, device="meta"))


@pytest.fixture
def gpu_of(monkeypatch):
    def gpu(gib: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(total_memory=gib << 30))
    return gpu


def test_vllm_samples_beside_the_trained_model_only_where_both_fit_and_never_for_qlora(gpu_of):
    gpu_of(80)
    small = Weights(8 << 30)  # 16 GiB of bf16 weights, an 8B model
    engine, why, share = sampling_engine(TrainConfig(), small)
    assert engine == "vllm" and share == pytest.approx(18 / 80) and why == "colocate mode, 22% of the GPU"
    assert sampling_engine(TrainConfig(adapter="qlora"), small)[:2] == (
        "transformers", "QLoRA's 4-bit weights: vLLM 0.32 cannot load bitsandbytes")
    gpu_of(24)  # an A10G: two copies of 16 GiB do not fit
    engine, why, _ = sampling_engine(TrainConfig(), small)
    assert engine == "transformers" and "do not fit beside the trained ones on a 24 GiB GPU" in why
