"""The GRPO stage (method=grpo, sft+grpo): TRL's GRPOTrainer samples num_generations answers to each of the
person's prompts, scores them with train/rewards.py (style, overlap, length, repetition) and moves the model
towards the answers that beat their group. train/recipes.py's train_stage runs it like every other stage, with
the same checkpoints, SIGTERM stop and voice metrics. Imports torch; TRL's GRPO only in grpo_trainer, because
importing it imports vLLM (TRL's sampling client), seconds that every other stage's job would pay at its start.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from datasets import Dataset

from container.config import ConfigError
from container.model_dir import kv_bytes_per_token
from train.config import TrainConfig
from train.distributed import SHARDED, numel, training_bytes, world_size
from train.rewards import grpo_rows, reward_functions

log = logging.getLogger(__name__)


def check_grpo(config: TrainConfig, rows: list[dict]) -> None:
    """What GRPO needs of a job, checked as it starts: conversation rows, and whole groups of answers in every
    optimizer step. TRL samples once per step (per_device_train_batch_size answers per micro-batch, on every
    process, for gradient_accumulation_steps micro-batches), num_generations answers to each prompt. A step that
    does not split into whole groups is refused, naming the nearest settings that do, rather than changed behind
    the user's back: each way out changes the memory a micro-batch takes or how many prompts a step learns from."""
    grpo_rows(rows)
    groups, processes = config.num_generations, int(os.environ.get("WORLD_SIZE", "1"))
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    answers = per_device * processes * accumulation
    if answers % groups == 0:
        return
    options = [f"per_device_train_batch_size={_nearest_multiple(per_device, groups, processes * accumulation)}",
               f"gradient_accumulation_steps={_nearest_multiple(accumulation, groups, per_device * processes)}"]
    divisors = [d for d in range(2, answers + 1) if answers % d == 0]
    if divisors:
        options.append(f"num_generations={min(divisors, key=lambda d: (abs(d - groups), -d))}")
    raise ConfigError(f"GRPO compares the num_generations={groups} answers to each prompt within one optimizer step, "
                      f"so a step's answers, per_device_train_batch_size={per_device} x {processes} process(es) x "
                      f"gradient_accumulation_steps={accumulation} = {answers}, must be a multiple of {groups}: "
                      f"set {', or '.join(options)}")


def _nearest_multiple(value: int, groups: int, other_factors: int) -> int:
    """The value nearest `value` (the smaller on a tie) that, times `other_factors`, is a multiple of `groups`."""
    step = groups // math.gcd(groups, other_factors)
    below = value - value % step
    return step if below == 0 else below if value - below <= below + step - value else below + step


def grpo_datasets(config: TrainConfig, tokenizer, train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """GRPO's rows: the prompt messages, and the person's answer as text (`reference`) for the rewards. A prompt and
    its longest answer must fit max_length (vLLM's context ends there), so a row whose prompt leaves less than
    max_completion_length tokens is dropped, and counted."""
    room = config.max_length - config.max_completion_length
    kept = []
    for name, split in (("training", train_rows), ("held-out", eval_rows)):
        texts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
                 for row in split]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        fitting = [row for row, length in zip(grpo_rows(split), lengths) if length <= room]
        if split and not fitting:
            raise ConfigError(f"GRPO: every {name} prompt is longer than max_length={config.max_length} - "
                              f"max_completion_length={config.max_completion_length} tokens, leaving no room for "
                              "an answer: raise max_length or lower max_completion_length")
        if len(fitting) < len(split):
            log.warning("grpo: %d of %d %s examples dropped: their prompt leaves less than max_completion_length=%d "
                        "tokens within max_length=%d", len(split) - len(fitting), len(split), name,
                        config.max_completion_length, config.max_length)
        kept.append(fitting)
    return {"train_dataset": Dataset.from_list(kept[0]),
            "eval_dataset": Dataset.from_list(kept[1]) if kept[1] else None}


VLLM_HEADROOM_BYTES = 2 * 2**30  # colocate: vLLM's activations (4096 batched tokens), CUDA graphs, non-torch memory


def sampling_engine(config: TrainConfig, model, choice: str) -> tuple[str, str, float]:
    """Where GRPO samples its answers, why, and vLLM's share of the GPU: vLLM in colocate mode (in this process,
    on its GPU, with its own copy of the weights; TRL loads the trained ones into it before each step's sampling)
    where CUDA is, vLLM imports and both copies fit the GPU; else transformers' generate, slower but in place.
    `choice`: the training's strategy (sharded, each GPU holds about its share of the training)."""
    if not torch.cuda.is_available():
        return "transformers", "no CUDA device", 0.0
    if config.adapter == "qlora":  # TRL would hand vLLM the 4-bit layers, and vLLM 0.32 has no bitsandbytes
        return "transformers", "QLoRA's 4-bit weights: vLLM 0.32 cannot load bitsandbytes", 0.0
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return "transformers", f"vLLM does not import ({e})", 0.0
    weights = sum(numel(p) for p in model.parameters()) * 2  # vLLM's copy, 16-bit (ZeRO-3's partitioned ones too)
    total = torch.cuda.get_device_properties(0).total_memory
    vllm = weights + kv_cache_bytes(config, model.config) + VLLM_HEADROOM_BYTES
    training = training_bytes(config, model, choice, "grpo") // (world_size() if choice in SHARDED else 1)
    if training + vllm > 0.9 * total:
        return ("transformers", f"vLLM's copy of the {weights / 2**30:.1f} GiB of weights and its cache "
                f"({vllm / 2**30:.1f} GiB) do not fit beside the training ({training / 2**30:.1f} GiB) on a "
                f"{total / 2**30:.0f} GiB GPU", 0.0)
    return "vllm", f"colocate mode, {vllm / total:.0%} of the GPU", vllm / total


def kv_cache_bytes(config: TrainConfig, model_config) -> int:
    """What vLLM's cache holds when one generation batch is sampled: TRL gives it a step's prompts
    (per_device_train_batch_size x gradient_accumulation_steps sequences) of up to max_length tokens, 16-bit."""
    per_token = kv_bytes_per_token(model_config.to_dict(), 2)
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * config.max_length * per_token


# common's arguments GRPOConfig lacks (its prompts are not truncated: grpo_datasets drops those too long), or that
# it deprecates (use_liger_kernel: a FutureWarning on every process, and only Liger's layer kernels apply)
GRPO_LEAVES_OUT = ("max_length", "use_liger_kernel")


def grpo_trainer(config: TrainConfig, common: dict, model, tokenizer, callbacks, datasets, peft_config,
                 choice: str):
    """TRL's GRPOTrainer: num_generations answers sampled to each prompt, scored by train/rewards.py against the
    person's writing, the model moved towards the answers that beat their group. beta (auto 0: none) weighs a KL
    term against the stage's starting model (the adapter switched off, or a frozen copy for full fine-tuning).
    Evaluation takes one prompt's group of answers per process at a time."""
    from trl import GRPOConfig, GRPOTrainer

    functions, weights = reward_functions(config, datasets["train_dataset"]["reference"])
    engine, why, share = sampling_engine(config, model, choice)
    # sleep mode: vLLM lets go of its weights and cache during each optimizer step, the training's peak
    vllm = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": config.max_length,
             "vllm_gpu_memory_utilization": share, "vllm_enable_sleep_mode": True} if engine == "vllm" else {})
    log.info("grpo: %d answers per prompt of at most %d tokens, sampled with %s (%s); rewards %s",
             config.num_generations, config.max_completion_length, engine, why,
             ", ".join(f"{getattr(f, 'func', f).__name__} x{w:g}" for f, w in zip(functions, weights)))
    shared = {k: v for k, v in common.items() if k not in GRPO_LEAVES_OUT}
    args = GRPOConfig(**{**shared, "per_device_eval_batch_size": config.num_generations},
                      beta=config.stage_beta("grpo"), num_generations=config.num_generations,
                      max_completion_length=config.max_completion_length, reward_weights=weights, **vllm)
    return GRPOTrainer(model=model, reward_funcs=functions, args=args, processing_class=tokenizer,
                       peft_config=peft_config, callbacks=callbacks, **datasets)


def grpo_report(trainer) -> dict:
    """How GRPO sampled, what it rewarded, and the rewards (each function's mean and the weighted total) at its
    first and last logging steps: whether the answers moved towards the person's."""
    names = trainer.reward_func_names

    def rewards(entry: dict) -> dict:
        return {"step": entry.get("step"), "reward": entry.get("reward"),
                **{name: entry.get(f"rewards/{name}/mean") for name in names}}

    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    return {"generation": "vllm" if trainer.args.use_vllm else "transformers",
            "num_generations": trainer.args.num_generations,
            "reward_weights": dict(zip(names, trainer.args.reward_weights)),
            "first": rewards(logged[0]) if logged else None, "last": rewards(logged[-1]) if logged else None}
