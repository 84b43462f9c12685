"""train/distributed.py's plan: what a LoRA job trains is counted as peft will make it, before peft wraps the
model (while every base weight still says requires_grad)."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from train.config import TrainConfig
from train.distributed import trainable_count


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj"])
def test_a_lora_jobs_trainable_parameters_are_the_adapters_as_peft_counts_them(tiny_model, targets):
    config = TrainConfig(lora_r=8, lora_target_modules=tuple(targets.split(",")))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    counted = trainable_count(config, model)
    assert counted < sum(p.numel() for p in model.parameters() if p.requires_grad)  # not every base weight
    lora = LoraConfig(r=8, target_modules="all-linear" if targets == "all-linear" else targets.split(","))
    wrapped = get_peft_model(model, lora)
    assert counted == wrapped.get_nb_trainable_parameters()[0]
    assert trainable_count(config, wrapped) == counted  # and the same once wrapped
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert trainable_count(TrainConfig(adapter="full"), base) == sum(p.numel() for p in base.parameters())
