"""The training job's configuration: one frozen dataclass, built strictly from hyperparameters.json.

Field names follow TRL/transformers arguments wherever one exists. Defaults follow the LLM Twin recipe
(LoRA r=32, alpha=32, dropout 0 on all linear layers; DPO beta 0.5) with its bugs fixed, and TRL's
learning-rate guidance (LoRA takes about 10x the full fine-tuning rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from container.config import ConfigError, describe, from_strings

JOB_FILE = "job.json"  # in the checkpoint folder: the training its checkpoints belong to (train/checkpoints.py)
MIN_PASSAGE_TOKENS = 32  # a smaller passage_max_tokens leaves no room for a passage of documents.MIN_WORDS words
SEED_RANGE = 2**32  # numpy's: transformers' set_seed seeds it too

# (stage, full fine-tuning) -> peak learning rate; LoRA takes about 10x the full rate. ORPO's is its paper's
# 8e-6 (full); SimPO's and KTO's follow DPO's scale.
AUTO_LEARNING_RATES = {("sft", False): 2e-4, ("sft", True): 2e-5, ("dpo", False): 5e-6, ("dpo", True): 5e-7,
                       ("orpo", False): 8e-5, ("orpo", True): 8e-6, ("simpo", False): 5e-6, ("simpo", True): 5e-7,
                       ("kto", False): 5e-6, ("kto", True): 5e-7, ("grpo", False): 1e-5, ("grpo", True): 1e-6}
# beta=0 (auto): the LLM Twin recipe's 0.5 for DPO; each paper's default for the others (ORPO's lambda 0.1,
# SimPO's 2.0, KTO's 0.1).
# GRPO's KL coefficient: TRL's default 0.0 (no reference model: DAPO and Dr. GRPO found it unneeded).
AUTO_BETAS = {"dpo": 0.5, "orpo": 0.1, "simpo": 2.0, "kto": 0.1, "grpo": 0.0}
METHODS = ("sft", "dpo", "sft+dpo", "orpo", "simpo", "sft+simpo", "kto", "sft+kto", "grpo", "sft+grpo")
PREFERENCE_STAGES = ("dpo", "orpo", "simpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sigmoid_norm")


def _f(default, help: str, choices: tuple | None = None):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    # what to train
    model_id: str = _f("", "Hub id or local path of the base model. Empty: the `model` channel (a model folder or "
                           "model.tar.gz), else the embedded SmolLM2-135M-Instruct.")
    model_revision: str = _f("", "Hub revision (branch, tag or commit) of model_id.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub. Off unless you trust the repository.")
    method: str = _f("sft", "sft: the `train` channel; dpo: the `preference` channel; sft+dpo: SFT, then DPO on the "
                            "SFT model; orpo: SFT and preference in one stage (ORPO, no reference model); simpo: "
                            "reference-free preference optimisation; kto: unpaired good/bad examples; sft+simpo, "
                            "sft+kto: SFT first.", choices=METHODS)
    instructions: str = _f("rows", "What the `train` channel holds: rows, instruction data (Alpaca rows, prompt/"
                                   "completion, chat messages); or auto: the person's raw writing (.txt, .md, .html, "
                                   "JSON lines with a `text` field) in a `documents` channel (else `train`), cleaned, "
                                   "split into passages, and given the instruction each passage answers by a model in "
                                   "the job (instruction backtranslation); the rows are written to "
                                   "/opt/ml/output/data/instructions.jsonl.", choices=("rows", "auto"))
    teacher_model_id: str = _f("", "instructions=auto: hub id or local path of the model that writes the "
                                   "instructions. A `teacher` channel (a model folder), when given, comes first; "
                                   "empty and no channel: the base model.")
    passage_max_tokens: int = _f(384, "instructions=auto: longest passage, in estimated tokens (4/3 per word); "
                                      "documents are split on paragraph boundaries within it.")
    instructions_keep: float = _f(0.8, "instructions=auto: share of the passages that pass the length and language "
                                       "checks kept for training, the best by how much their instruction raises the "
                                       "teacher's likelihood of the passage.")
    preference: str = _f("channel", "Where the preference stage's data comes from: the `preference` channel, or auto: "
                                    "pairs built in the job from the `train` channel (the person's answer chosen, the "
                                    "model's own answer to the same prompt rejected), saved with the model as "
                                    "preference_pairs.jsonl (unless keep_writing_private).",
                         choices=("channel", "auto"))
    adapter: str = _f("lora", "lora; qlora (4-bit nf4 base + LoRA); full (every weight).",
                      choices=("lora", "qlora", "full"))
    export: str = _f("merged", "What the model dir holds: merged 16-bit weights, the adapter only (served on its "
                               "base), or both.", choices=("merged", "adapter", "both"))
    # LoRA
    lora_r: int = _f(32, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    lora_target_modules: tuple[str, ...] = _f(("all-linear",), "Modules that get LoRA adapters; all-linear = every "
                                                               "linear layer but the head.")
    # optimisation (SFT)
    learning_rate: float = _f(0.0, "SFT peak learning rate; 0 = auto: 2e-4 with adapters, 2e-5 for full.")
    num_train_epochs: float = _f(3.0, "SFT epochs (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "SFT optimizer steps; -1 = use num_train_epochs.")
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule.",
                                choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = _f(10, "Linear warmup steps.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    per_device_train_batch_size: int = _f(2, "Examples per device per forward pass.")
    gradient_accumulation_steps: int = _f(8, "Forward passes per optimizer step.")
    max_length: int = _f(2048, "Longest tokenized example (prompt + response); longer ones are truncated, and counted "
                               "in the log.")
    # the second stage (DPO, ORPO, SimPO, KTO or GRPO)
    dpo_learning_rate: float = _f(0.0, "Preference or GRPO stage peak learning rate; 0 = auto: with adapters 5e-6 "
                                       "(DPO, SimPO, KTO), 8e-5 (ORPO) or 1e-5 (GRPO), a tenth of that for full.")
    dpo_num_train_epochs: float = _f(1.0, "Preference or GRPO stage epochs (ignored when dpo_max_steps > 0).")
    dpo_max_steps: int = _f(-1, "Preference or GRPO stage optimizer steps; -1 = use dpo_num_train_epochs.")
    beta: float = _f(0.0, "DPO/KTO beta (how far the policy may move from the reference), ORPO's lambda, SimPO's "
                          "reward scale, GRPO's KL coefficient; 0 = auto: 0.5 DPO (LLM Twin), 0.1 ORPO and KTO, 2.0 "
                          "SimPO, 0 GRPO (no reference model).")
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin.")
    preference_max_new_tokens: int = _f(256, "Longest rejected answer generated for preference=auto.")
    dpo_loss_type: str = _f("sigmoid", "DPO loss (TRL's loss_type).", choices=DPO_LOSS_TYPES)
    # GRPO (method=grpo, sft+grpo): the dpo_* learning rate, epochs and steps apply; beta is its KL coefficient
    num_generations: int = _f(4, "GRPO: answers sampled per prompt, compared with each other.")
    max_completion_length: int = _f(128, "GRPO: longest sampled answer, in tokens.")
    style_reward_weight: float = _f(1.0, "GRPO: weight of closeness to the person's style (1 - style distance from the "
                                         "profile of all their answers).")
    overlap_reward_weight: float = _f(1.0, "GRPO: weight of word overlap (unigram F1) with the person's real answer.")
    length_reward_weight: float = _f(0.5, "GRPO: weight of closeness to the person's answer length.")
    repetition_reward_weight: float = _f(1.0, "GRPO: weight of the penalty for repeated word pairs.")
    # evaluation
    validation_split: float = _f(0.05, "Fraction held out for eval loss when there is no `validation` (SFT) / "
                                       "`preference_validation` (DPO) channel; 0 = none.")
    eval_steps: int = _f(0, "Evaluate every this many steps; 0 = at the end of each stage.")
    voice_eval_prompts: int = _f(8, "Held-out prompts the model answers at every evaluation, scored against the "
                                    "person's real answers (voice metrics, also for the base model before training); "
                                    "0 = off.")
    voice_max_new_tokens: int = _f(128, "Longest answer generated for the voice metrics.")
    early_stopping_patience: int = _f(0, "End a stage after this many evaluations without improvement of "
                                         "metric_for_best_model; 0 = off. Needs eval_steps > 0 and held-out data.")
    metric_for_best_model: str = _f("eval_loss", "What early stopping and load_best_model_at_end compare: the held-out "
                                                 "loss, or a voice metric.",
                                    choices=("eval_loss", "voice_style_distance", "voice_overlap"))
    load_best_model_at_end: bool = _f(False, "End each stage with its best checkpoint's weights (by "
                                             "metric_for_best_model), not the last. Needs eval_steps > 0, save_steps a "
                                             "multiple of it, and held-out data.")
    # efficiency and hardware
    packing: str = _f("auto", "Padding-free packing (no cross-example attention). auto = on where flash-attention 2 is "
                              "installed (GPU), else off.", choices=("auto", "true", "false"))
    group_by_length: bool = _f(True, "Without packing, batch examples of similar length (less padding).")
    gradient_checkpointing: str = _f("auto", "Recompute activations to save memory (about 30% more compute). auto = on "
                                             "when the GPU would otherwise be tight.",
                                     choices=("auto", "true", "false"))
    bf16: str = _f("auto", "bfloat16 mixed precision: auto = on GPUs that support it.",
                   choices=("auto", "true", "false"))
    # distribution (one GPU, many GPUs, many instances)
    distributed: str = _f("auto", "auto: one process per GPU on every instance, DDP when the model and its optimizer "
                                  "state fit one GPU, else DeepSpeed ZeRO-3; or force ddp, zero2, zero3, fsdp.",
                          choices=("auto", "ddp", "zero2", "zero3", "fsdp"))
    processes_per_host: int = _f(0, "Training processes per instance; 0 = one per GPU (1 on the CPU).")
    master_port: int = _f(7777, "TCP port of the rendezvous on the first instance.")
    ddp_timeout: int = _f(1800, "Seconds a collective may wait for a peer before the job fails.")
    dns_timeout: int = _f(900, "Seconds to keep retrying the first instance's host name (SageMaker's DNS can be late).")
    # checkpoints, logs, serving
    save_steps: int = _f(50, "Checkpoint to /opt/ml/checkpoints every this many steps (and on SIGTERM).")
    save_total_limit: int = _f(2, "Checkpoints kept per stage; older ones are deleted.")
    logging_steps: int = _f(1, "Log metrics every this many optimizer steps.")
    report_to: tuple[str, ...] = _f(("none",), "Experiment tracking, one or more of: tensorboard (event files in "
                                               "/opt/ml/output/tensorboard/<stage>, uploaded by the job's "
                                               "TensorBoardOutputConfig: launch train --tensorboard S3URI); mlflow (a "
                                               "run on MLFLOW_TRACKING_URI, a SageMaker managed MLflow tracking-server "
                                               "ARN or any tracking server: launch train --mlflow ARN); wandb (a run "
                                               "in WANDB_PROJECT with WANDB_API_KEY, or WANDB_MODE=offline: launch "
                                               "train --wandb). Hyperparameters, training, eval and voice metrics, the "
                                               "model card.", choices=("none", "tensorboard", "mlflow", "wandb"))
    keep_writing_private: bool = _f(False, "Keep the person's writing in the job: no sample answers (held-out prompts, "
                                           "the person's answers, the model's) in the model card and "
                                           "training_report.json, no preference_pairs.jsonl; so none of it reaches "
                                           "/opt/ml/model, /opt/ml/output or the trackers, only counts and aggregate "
                                           "metrics do.")
    seed: int = _f(42, "Random seed for data order, the validation split and LoRA initialisation.")
    max_new_tokens: int = _f(256, "Default max_new_tokens written to the model's serving defaults.")

    def __post_init__(self):
        positive = ("lora_r", "lora_alpha", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
                    "logging_steps", "max_new_tokens", "save_steps", "save_total_limit", "voice_max_new_tokens",
                    "preference_max_new_tokens", "passage_max_tokens", "num_generations", "max_completion_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"hyperparameter {name}={getattr(self, name)} must be greater than 0")
        for name in ("learning_rate", "dpo_learning_rate", "weight_decay", "warmup_steps", "eval_steps",
                     "voice_eval_prompts", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"hyperparameter {name}={getattr(self, name)} must not be negative")
        if self.beta < 0:
            raise ConfigError(f"hyperparameter beta={self.beta} must be greater than 0, or 0 for each method's default")
        if "kto" in self.stages and self.per_device_train_batch_size < 2:
            raise ConfigError("KTO estimates its KL term from the other examples of a batch: "
                              "per_device_train_batch_size must be at least 2")
        if self.preference == "auto" and not any(stage in PREFERENCE_STAGES for stage in self.stages):
            raise ConfigError(f"preference=auto builds data for a preference stage, but method={self.method} has none: "
                              "use method=sft+dpo (or dpo, orpo, simpo, kto)")
        if self.passage_max_tokens < MIN_PASSAGE_TOKENS:
            raise ConfigError(f"hyperparameter passage_max_tokens={self.passage_max_tokens} must be at least "
                              f"{MIN_PASSAGE_TOKENS}: a passage is at least a paragraph of some 20 words")
        if not 0 <= self.seed < SEED_RANGE:
            raise ConfigError(f"hyperparameter seed={self.seed} must be in [0, {SEED_RANGE - 1}]")
        if not 0.0 < self.instructions_keep <= 1.0:
            raise ConfigError(f"hyperparameter instructions_keep={self.instructions_keep} must be in (0, 1]")
        if self.instructions == "auto" and self.preference != "auto" and not {"sft", "grpo"} & set(self.stages):
            raise ConfigError(f"instructions=auto makes rows for the stages that read the `train` channel, but "
                              f"method={self.method} reads only the `preference` channel: use method=sft+dpo, or "
                              "preference=auto")
        if self.instructions == "rows" and self.teacher_model_id:
            raise ConfigError("teacher_model_id names the model that writes instructions for instructions=auto: "
                              "set instructions=auto, or leave teacher_model_id empty")
        if self.num_generations < 2 and "grpo" in self.stages:
            raise ConfigError(f"hyperparameter num_generations={self.num_generations}: GRPO compares each answer "
                              "with the others for its prompt, so it needs at least 2")
        for name in ("style_reward_weight", "overlap_reward_weight", "length_reward_weight",
                     "repetition_reward_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"hyperparameter {name}={getattr(self, name)} must not be negative")
        if "grpo" in self.stages and not (self.style_reward_weight or self.overlap_reward_weight
                                          or self.length_reward_weight or self.repetition_reward_weight):
            raise ConfigError("GRPO needs a reward: every *_reward_weight is 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"hyperparameter lora_dropout={self.lora_dropout} must be in [0, 1)")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"hyperparameter validation_split={self.validation_split} must be in [0, 1)")
        for steps, epochs in (("max_steps", "num_train_epochs"), ("dpo_max_steps", "dpo_num_train_epochs")):
            if getattr(self, steps) <= 0 and getattr(self, steps) != -1:
                raise ConfigError(f"hyperparameter {steps}={getattr(self, steps)} must be positive, "
                                  f"or -1 to use {epochs}")
            if getattr(self, steps) == -1 and getattr(self, epochs) <= 0:
                raise ConfigError(f"hyperparameter {epochs}={getattr(self, epochs)} must be greater than 0")
        if not self.report_to or ("none" in self.report_to and len(self.report_to) > 1) or \
                len(set(self.report_to)) < len(self.report_to):
            raise ConfigError(f"hyperparameter report_to={','.join(self.report_to)}: name trackers (e.g. "
                              "tensorboard,mlflow), each once, or none alone")
        if not self.lora_target_modules:
            raise ConfigError("hyperparameter lora_target_modules is empty: name modules or use all-linear")
        if self.adapter == "full" and self.export != "merged":
            raise ConfigError(f"export={self.export} needs an adapter, but adapter=full trains every weight: use "
                              "export=merged")
        if self.adapter == "qlora" and self.distributed in ("zero3", "fsdp"):
            raise ConfigError(f"adapter=qlora with distributed={self.distributed} is not supported here (bitsandbytes "
                              "4-bit weights cannot be sharded by this stack): use distributed=ddp or zero2, "
                              "or adapter=lora")
        if (self.processes_per_host < 0 or not 0 < self.master_port < 65536 or self.ddp_timeout <= 0
                or self.dns_timeout < 0):
            raise ConfigError("hyperparameters processes_per_host >= 0, 0 < master_port < 65536, ddp_timeout > 0 and "
                              "dns_timeout >= 0 are required")
        if (self.early_stopping_patience or self.load_best_model_at_end) and not self.eval_steps:
            raise ConfigError("early_stopping_patience and load_best_model_at_end compare evaluations during a stage: "
                              "set eval_steps (e.g. eval_steps=50) and keep held-out data (a validation channel or "
                              "validation_split > 0)")
        if self.load_best_model_at_end and self.save_steps % self.eval_steps:
            raise ConfigError("load_best_model_at_end needs a checkpoint at every evaluation: "
                              f"save_steps={self.save_steps} must be a multiple of eval_steps={self.eval_steps} "
                              f"(e.g. save_steps={self.eval_steps})")
        if self.metric_for_best_model.startswith("voice_") and not self.voice_eval_prompts:
            raise ConfigError(f"metric_for_best_model={self.metric_for_best_model} is a voice metric, but "
                              "voice_eval_prompts=0 turns them off")
        if len(self.stages) > 1 and self.export == "adapter":
            raise ConfigError(f"export=adapter cannot describe {self.method} (the second stage's adapter sits on the "
                              "SFT model, which exists only inside the job): use export=merged or export=both")

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.method.split("+"))

    def stage_learning_rate(self, stage: str) -> float:
        chosen = self.learning_rate if stage == "sft" else self.dpo_learning_rate
        return chosen or AUTO_LEARNING_RATES[(stage, self.adapter == "full")]

    def stage_beta(self, stage: str) -> float:
        return self.beta or AUTO_BETAS[stage]

    def reference_copy(self, stage: str) -> bool:
        """Whether `stage` compares with a frozen copy of the model, which TRL loads itself: in full fine-tuning,
        DPO, KTO and GRPO with a KL term (beta > 0). With LoRA and QLoRA the reference is the base with the
        adapter switched off; ORPO and SimPO have none."""
        return self.adapter == "full" and (stage in ("dpo", "kto") or (stage == "grpo" and self.stage_beta(stage) > 0))

    @classmethod
    def from_hyperparameters(cls, raw: Mapping[str, str]) -> "TrainConfig":
        return from_strings(cls, raw, "hyperparameter")


def hyperparameter_table() -> str:
    """The README's hyperparameter table, generated from TrainConfig (tests check the README matches)."""
    lines = ["| name | type | default | meaning |", "| --- | --- | --- | --- |"]
    for row in describe(TrainConfig):
        default = row["default"]
        if isinstance(default, tuple):
            default = ",".join(default)
        default = f"`{default}`" if default != "" else "(empty)"
        meaning = row["help"]
        if row["choices"]:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in row["choices"]) + "."
        lines.append(f"| `{row['name']}` | {row['type']} | {default} | {meaning} |")
    return "\n".join(lines)
