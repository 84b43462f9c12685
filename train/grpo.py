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
from train.config import TrainConfig
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


def sampling_engine() -> tuple[str, str]:
    """Where GRPO samples its answers, and why: vLLM in colocate mode (in this process, on its GPU; TRL loads the
    trained weights into it before each step's sampling) where CUDA is and vLLM imports, else transformers'
    generate (the CPU)."""
    if not torch.cuda.is_available():
        return "transformers", "no CUDA device"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        return "transformers", f"vLLM does not import ({e})"
    return "vllm", "CUDA and vLLM are here; colocate mode"


# common's arguments GRPOConfig lacks (its prompts are not truncated: grpo_datasets drops those too long), or that
# it deprecates (use_liger_kernel: a FutureWarning on every process, and only Liger's layer kernels apply)
GRPO_LEAVES_OUT = ("max_length", "use_liger_kernel")


def grpo_trainer(config: TrainConfig, common: dict, model, tokenizer, callbacks, datasets, peft_config):
    """TRL's GRPOTrainer: num_generations answers sampled to each prompt, scored by train/rewards.py against the
    person's writing, the model moved towards the answers that beat their group. beta (auto 0: none) weighs a KL
    term against the stage's starting model (the adapter switched off, or a frozen copy for full fine-tuning).
    Evaluation takes one prompt's group of answers per process at a time."""
    from trl import GRPOConfig, GRPOTrainer

    functions, weights = reward_functions(config, datasets["train_dataset"]["reference"])
    engine, why = sampling_engine()
    vllm = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": config.max_length}
            if engine == "vllm" else {})
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
