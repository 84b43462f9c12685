"""Full fine-tuning's mixed precision through the real train_stage (TRL's trainers, the Trainer, accelerate), on
the CPU with bf16 on as a GPU with native bf16 has it: accelerate then computes under the CPU's bf16 autocast.
The weights load as train/plan.weights_dtype says; what trains stays fp32, and DPO's frozen reference (TRL's
own load, from train_stage's model_init_kwargs) computes exactly as the model does before the first step."""

import json
from pathlib import Path

import torch

from local_test.tiny_model import TINY_ROWS
from train.config import TrainConfig
from train.data import to_preference_row, to_sft_row
from train.model import load_for_training, load_tokenizer
from train.plan import Device, weights_dtype
from train.recipes import RunContext, StageRows, train_stage
from train.stop import Stop

BF16 = Device(use_cpu=True, bf16=True, dtype=torch.bfloat16, attn_implementation=None, liger=False)
PAIRS = [{"prompt": f"Write about lesson {i}.", "chosen": f"Lesson {i}: measure first.",
          "rejected": f"Great question! Lesson {i} is crucial."} for i in range(4)]


def first_logged(stage_dir: Path) -> dict:
    state = json.loads((stage_dir / "checkpoint-1" / "trainer_state.json").read_text())
    return state["log_history"][0]


def test_full_fine_tuning_trains_fp32_weights_under_bf16_autocast_and_dpos_reference_matches(tiny_model, tmp_path):
    config = TrainConfig(adapter="full", max_steps=1, dpo_max_steps=1, per_device_train_batch_size=2,
                         gradient_accumulation_steps=1, max_length=64, warmup_steps=0, save_steps=1,
                         logging_steps=1, validation_split=0.0, voice_eval_prompts=0)
    tokenizer = load_tokenizer(str(tiny_model), config)
    run = RunContext(BF16, Stop())
    model = load_for_training(str(tiny_model), config, weights_dtype(config, BF16, "single"), None)
    before = [p.detach().clone() for p in model.parameters()]
    computed = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
    rows = [to_sft_row(row, "tiny") for row in TINY_ROWS]
    trained, report = train_stage("sft", config, model, tokenizer, StageRows(rows, []), tmp_path / "sft", run)
    assert report["weights_dtype"] == "float32" and report["bf16"] is True
    assert computed and set(computed) == {torch.bfloat16}  # the Trainer's autocast did the compute
    assert all(p.dtype == torch.float32 for p in model.parameters())  # and what trained stayed fp32
    moved = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
    assert moved / sum(b.numel() for b in before) > 0.9  # at full fine-tuning's SFT rate, 2e-5: most weights
    adam = torch.load(tmp_path / "sft" / "checkpoint-1" / "optimizer.pt", weights_only=True)["state"]
    assert adam and all(s["exp_avg"].dtype == torch.float32 for s in adam.values())

    policy = load_for_training(str(trained), config, weights_dtype(config, BF16, "single"), None)
    pairs = [to_preference_row(row, "pairs") for row in PAIRS]
    _, report = train_stage("dpo", config, policy, tokenizer, StageRows(pairs, []), tmp_path / "dpo", run)
    step = first_logged(tmp_path / "dpo")
    # the reference is TRL's load of the same fp32 weights: before any update, policy and reference agree
    assert step["rewards/chosen"] == step["rewards/rejected"] == step["rewards/margins"] == 0.0, step
