"""The training stages, one TRL trainer each: SFT (SFTTrainer, loss on completions only) and the preference
stages DPO (DPOTrainer), ORPO (ORPOTrainer), SimPO (CPOTrainer with loss_type=simpo and no SFT term) and KTO
(KTOTrainer, unpaired good and bad examples). DPO and KTO compare with a reference model: the PEFT base with
the adapter disabled (no second model copy), or a frozen copy for full fine-tuning; ORPO and SimPO need none.
GRPO (GRPOTrainer, built in train/grpo.py) samples answers to the person's prompts and rewards those that read
as the person's (train/rewards.py). LoRA, QLoRA or full.

Imports torch and TRL: `train.__main__` imports this only after config and data are checked.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from container.config import ConfigError
from train.checkpoints import (MarkComplete, Markers, StopAtNextMicroBatch, newest_saved,
                               on_first_process, resume_checkpoint, saved_checkpoints)
from train.config import TrainConfig
from train.distributed import (SHARDED, distributed_args, native_bf16, strategy, trainable_count, training_bytes,
                               world_size)
from train.errors import TrainingInterrupted
from train.metrics import TokenRate, format_log_line
from train.grpo import check_grpo, grpo_datasets, grpo_report, grpo_trainer
from train.stop import Stop
from train.tracking import Tracking
from train.voice import bf16_compute, held_out_prompts, measure, prompts_digest, serving_sampling

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = ("voice_overlap",)


@dataclass(frozen=True)
class Device:
    use_cpu: bool
    bf16: bool
    dtype: torch.dtype
    attn_implementation: str | None  # flash_attention_2 when installed on a GPU, else the default (sdpa)
    liger: bool


def detect_device(config: TrainConfig) -> Device:
    cuda = torch.cuda.is_available()
    bf16_supported = native_bf16()
    if config.bf16 == "true" and not bf16_supported:
        raise ConfigError("hyperparameter bf16=true needs a GPU with bfloat16 support (Ampere or newer); use bf16=auto")
    bf16 = bf16_supported if config.bf16 == "auto" else config.bf16 == "true"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    return Device(use_cpu=not cuda, bf16=bf16, dtype=torch.bfloat16 if bf16 else torch.float32,
                  attn_implementation="flash_attention_2" if flash else None, liger=liger)


def weights_dtype(config: TrainConfig, device: Device, planned: str) -> torch.dtype:
    """The dtype the model's weights load in. Full fine-tuning keeps fp32 weights, the master copy that mixed
    precision updates while bf16 computes under the Trainer's autocast: stored in bf16, a weight keeps 8 bits of
    mantissa, and an AdamW step under half its last bit rounds away. At full fine-tuning's learning rates that is
    most steps (3 steps moved 3.8% of SmolLM2's bf16 weights at 2e-5, 0.3% at DPO's 5e-7; 100% in fp32), and
    TRL loads a model it is given by name in fp32 for this reason. Sharded (`planned`, planned_strategy()'s
    choice), DeepSpeed keeps its own fp32 master copy and accelerate's FSDP casts what trains to fp32 itself, so
    the weights load in bf16 there, as LoRA's frozen base does, and every process's host copy stays small."""
    if config.adapter == "full" and device.bf16 and planned not in SHARDED:
        return torch.float32
    return device.dtype


def use_packing(config: TrainConfig, device: Device) -> bool:
    """Padding-free packing keeps examples apart through position ids; it pays with flash-attention's
    variable-length kernels. On SDPA (and on the CPU) it is slower than length-grouped batches."""
    if config.packing == "auto":
        return device.attn_implementation == "flash_attention_2"
    return config.packing == "true"


def use_gradient_checkpointing(config: TrainConfig, model, choice: str, stage: str) -> bool:
    """auto: on when weights, gradients and optimizer state would take over half the GPU's memory (sharded: each
    GPU's share of them, about)."""
    if config.gradient_checkpointing != "auto":
        return config.gradient_checkpointing == "true"
    if not torch.cuda.is_available():
        return False
    need = training_bytes(config, model, choice, stage) // (world_size() if choice in SHARDED else 1)
    total = torch.cuda.get_device_properties(0).total_memory
    on = need > 0.5 * total
    log.info("gradient_checkpointing=auto: about %.1f GiB of weights and optimizer state on a %.1f GiB GPU -> %s",
             need / 2**30, total / 2**30, "on" if on else "off")
    return on


def check_fits(config: TrainConfig, model, stage: str) -> None:
    """Refuse a job whose weights, gradients and optimizer state alone exceed a GPU's memory, where that GPU holds
    all of them (one GPU, or DDP): it would fail with CUDA out of memory at its first step. The stages still to
    run are checked too, so that a DPO stage with its frozen reference is not refused after hours of SFT."""
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    stages = config.stages[config.stages.index(stage):] if stage in config.stages else (stage,)
    for later in stages:
        choice = strategy(config, model, later)
        need = training_bytes(config, model, choice, later)
        if choice not in ("single", "ddp") or need <= total:
            continue
        instead = {"full": "use adapter=lora or adapter=qlora, or shard it with distributed=zero3 over enough GPUs",
                   "lora": "use adapter=qlora, or shard it with distributed=zero3 over enough GPUs",
                   "qlora": "use a GPU with more memory (QLoRA's 4-bit weights are not sharded here)"}[config.adapter]
        raise ConfigError(
            f"adapter={config.adapter} holds about {need / 2**30:.0f} GiB of weights, gradients and optimizer state "
            f"on each GPU in {later} ({choice}), more than a GPU's {total / 2**30:.0f} GiB: {instead}")


def check_checkpoint_space(config: TrainConfig, model, choice: str, stage_dir: Path, steps: int | None) -> None:
    """Refuse, before the first step, a volume that cannot hold the stage's checkpoints and its trained model.
    A checkpoint holds the trained weights and AdamW's moments (12 bytes a trained parameter in fp32, 14 under ZeRO
    with its bf16 copy); up to save_total_limit of them stay, one more while the next is written, and fewer when
    the stage's `steps` (None: not known) make fewer saves. The trained model follows (4 bytes a parameter in fp32,
    and the next stage's bf16 copy). Only full fine-tuning's are large; a job that runs out of space at its third
    save has trained for hours."""
    trained = trainable_count(config, model)
    per_checkpoint = trained * (14 if choice in SHARDED else 12)
    saves = config.save_total_limit + 1 if steps is None else min(config.save_total_limit + 1,
                                                                   steps // config.save_steps + 1)
    kept = len(saved_checkpoints(stage_dir))  # a resumed job's are on the volume already
    needed = max(saves - kept, 1) * per_checkpoint + trained * (2 if choice in SHARDED else 4) + trained * 2
    folder = stage_dir
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"not enough disk space for {stage_dir.name}: its checkpoints take about {per_checkpoint / 1e9:.0f} GB "
            f"each, up to {saves} at once (save_total_limit={config.save_total_limit}, one more while one is "
            f"written), and its trained model follows: {needed / 1e9:.0f} GB, more than {folder} has now "
            f"({free / 1e9:.0f} GB free): give the job a larger volume (launch train --volume-size GB; SageMaker's "
            "VolumeSizeInGB) or a lower save_total_limit")


def planned_steps(config: TrainConfig, stage: str, rows: int) -> int | None:
    """The optimizer steps the Trainer will take over `rows` (None for GRPO, whose batches are answers)."""
    if stage == "grpo":
        return None
    max_steps = config.max_steps if stage == "sft" else config.dpo_max_steps
    if max_steps > 0:
        return max_steps
    epochs = config.num_train_epochs if stage == "sft" else config.dpo_num_train_epochs
    batches = math.ceil(rows / (config.per_device_train_batch_size * world_size()))
    return math.ceil(epochs * math.ceil(batches / config.gradient_accumulation_steps))


def lora_config(config: TrainConfig) -> LoraConfig | None:
    if config.adapter == "full":
        return None
    targets = config.lora_target_modules
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear" if targets == ("all-linear",) else list(targets),
                      task_type="CAUSAL_LM")


@dataclass(frozen=True)
class StageRows:
    """A stage's data: its training rows and its held-out evaluation rows (possibly none)."""

    train: list[dict]
    eval: list[dict]


@dataclass(frozen=True)
class RunContext:
    """What every stage of one job shares: the device, the SIGTERM stop, the checkpoint markers, the trackers,
    and where a stage's model came from at which commit."""

    device: Device
    stop: Stop
    markers: Markers = Markers()
    tracking: Tracking = Tracking([])
    revision: Callable[[str], str | None] = lambda source: None  # BaseModel.revision_of: a hub base's commit


def train_stage(stage: str, config: TrainConfig, model, tokenizer, rows: StageRows, stage_dir: Path,
                run: RunContext) -> tuple[Path, dict]:
    """Train one stage (resuming from its newest checkpoint that verifies). Every rank saves the result (ZeRO-3
    gathers the weights then) to `stage_dir/trained`: the adapter, or the full model. Returns it and a report."""
    train_rows, eval_rows = rows.train, rows.eval
    if "grpo" in config.stages:  # also in sft+grpo's SFT stage: refused now, not after hours of SFT
        check_grpo(config, train_rows)
    device, stop, markers, tracking = run.device, run.stop, run.markers, run.tracking
    packing = stage == "sft" and use_packing(config, device)
    comparing = bool(config.early_stopping_patience or config.load_best_model_at_end)
    choice = strategy(config, model, stage)
    check_fits(config, model, stage)
    check_checkpoint_space(config, model, choice, stage_dir, planned_steps(config, stage, len(train_rows)))
    checkpointing = use_gradient_checkpointing(config, model, choice, stage)
    loaded_dtype = "nf4" if config.adapter == "qlora" else str(next(model.parameters()).dtype).split(".")[-1]
    common = dict(
        output_dir=str(stage_dir),
        learning_rate=config.stage_learning_rate(stage),
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs if stage == "sft" else config.dpo_num_train_epochs,
        max_steps=config.max_steps if stage == "sft" else config.dpo_max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        gradient_checkpointing=checkpointing,
        bf16=device.bf16,
        use_cpu=device.use_cpu,
        use_liger_kernel=device.liger,
        seed=config.seed,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if eval_rows and config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        load_best_model_at_end=config.load_best_model_at_end,
        metric_for_best_model=config.metric_for_best_model if comparing else None,
        greater_is_better=config.metric_for_best_model in HIGHER_IS_BETTER if comparing else None,
        restore_callback_states_from_checkpoint=True,  # a resumed spot job keeps early stopping's patience count
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        # TRL names the lengths `input_ids` only for SFT; DPO batches pairs, so it keeps random order
        train_sampling_strategy=("group_by_length" if stage == "sft" and config.group_by_length and not packing
                                 else "random"),
        report_to="none",
        disable_tqdm=True,
        **distributed_args(config, choice),
    )
    if config.reference_copy(stage):
        # TRL loads the frozen reference itself, with these, in the model's own dtype: the same weights computing
        # the same way, so that both agree exactly before the first step (a bf16 reference beside fp32 weights
        # differed by up to 0.47 nats a sequence on SmolLM2). ORPO and SimPO refuse model_init_kwargs.
        source = model.config._name_or_path
        revision = {"revision": run.revision(source)} if run.revision(source) else {}
        common["model_init_kwargs"] = {"use_safetensors": True, **revision}
    voice = VoiceCallback(stage, tokenizer, eval_rows, config, enabled=choice in ("single", "ddp"), tracking=tracking,
                          bf16=device.bf16)
    if comparing and config.metric_for_best_model.startswith("voice_") and not voice.prompts:
        raise ConfigError(f"metric_for_best_model={config.metric_for_best_model}: {stage} has no voice metrics to "
                          f"compare (they need held-out conversation rows, and are off under {choice}): use eval_loss")
    if voice.prompts and int(os.environ.get("RANK", "0")) == 0:
        with stop.phase(f"measuring the voice of the {stage} starting model"):
            voice.before = voice.measure(model)
        tracking.log(stage, 0, voice.before)  # step 0: where the curves start
    with stop.phase(f"preparing {stage} (tokenizing the data)"):
        stopper = StopAtNextMicroBatch(stop)
        # MarkComplete last: it acts on the save that the callbacks before it decided
        callbacks = [MetricsLogCallback(stage, tracking), voice, stopper, MarkComplete(markers)]
        if config.early_stopping_patience:  # after the voice callback: it may compare a voice metric
            callbacks.insert(2, EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
        datasets = ({"train_dataset": Dataset.from_list(train_rows),
                     "eval_dataset": Dataset.from_list(eval_rows) if eval_rows else None}
                    if stage != "grpo" else grpo_datasets(config, tokenizer, train_rows, eval_rows))
        if stage == "sft":
            args = SFTConfig(**common, completion_only_loss=True, packing=packing, padding_free=packing)
            trainer = ReplayableSFTTrainer(model=model, args=args, processing_class=tokenizer,
                                           peft_config=lora_config(config), callbacks=callbacks, **datasets)
        elif stage == "grpo":
            trainer = grpo_trainer(config, common, model, tokenizer, callbacks, datasets, lora_config(config), choice)
        else:
            trainer = preference_trainer(stage, config, common, model, tokenizer, callbacks, datasets)
        trainer.remove_callback(PrinterCallback)  # MetricsLogCallback prints the same numbers, regex-friendly
        stopper.attach(trainer)

        report = {"examples": len(train_rows), "eval_examples": len(eval_rows), "packing": packing,
                  "gradient_checkpointing": checkpointing, "learning_rate": common["learning_rate"],
                  "distributed": choice, "world_size": world_size(), "bf16": device.bf16,
                  "weights_dtype": loaded_dtype}
        report.update(_data_losses(stage, trainer, train_rows, config, packing))
        with stop.phase(f"verifying {stage}'s checkpoints"):
            resume = on_first_process(lambda: resume_checkpoint(stage_dir, markers))  # one step for every rank
        if resume is not None:
            log.info("resuming %s from %s (step %s)", stage, resume, resume.name.split("-")[-1])
            report["resumed_from_step"] = int(resume.name.split("-")[-1])
    with stop.phase(f"training {stage}", deferred=True):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.agree():  # every rank the same answer, also for a SIGTERM after the last step's decision
        newest = newest_saved(stage_dir, markers)  # the step's own, or (past the last decision) an earlier one
        saved = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
        raise TrainingInterrupted(
            f"training stopped by SIGTERM during {stage} at step {trainer.state.global_step} "
            f"of {trainer.state.max_steps}; "
            f"{saved}: start the job again with the same checkpoint location to resume")
    metrics = dict(result.metrics)
    if eval_rows:
        with stop.phase(f"evaluating {stage}"):
            metrics.update(trainer.evaluate())
    report.update(steps=trainer.state.global_step,
                  metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                  tokens_per_second=callbacks[0].mean_tokens_per_second())
    if stage == "grpo":
        report["grpo"] = grpo_report(trainer)
    if trainer.state.best_model_checkpoint:
        report["best"] = {"metric": config.metric_for_best_model, "value": trainer.state.best_metric,
                          "checkpoint": Path(trainer.state.best_model_checkpoint).name,
                          "loaded": config.load_best_model_at_end}
    if voice.before is not None:
        report["voice"] = voice.report()
    trained = stage_dir / "trained"
    with stop.phase(f"saving what {stage} trained"):
        trainer.save_model(str(trained))  # on every rank: under ZeRO-3 saving is a collective
    if choice in ("zero2", "zero3"):  # later loads (merging, the next stage's base) are plain, one-process loads
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return trained, report


class SeededLengthSampler(LengthGroupedSampler):
    """group_by_length's order drawn from seed + the epoch being started. transformers' own draws from the global
    random state, which a resumed job has not put back when the order of its epoch is drawn: the resumed epoch
    then repeated some examples and missed others. With this, a restart's epoch has the interrupted run's order,
    on every rank. `epoch()` is read when an epoch's iteration starts (the wrappers a resumed multi-process run
    puts around a sampler do not pass set_epoch on)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int, epoch: Callable[[], int]):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch())
        return super().__iter__()


class ReplayableSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with SeededLengthSampler for group_by_length, its epoch from the trainer's state (which
    a resumed run restores from its checkpoint before the epoch starts)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthSampler(sampler.batch_size, sampler.lengths, seed, lambda: int(self.state.epoch or 0))
        return sampler


def _data_losses(stage: str, trainer, rows: list[dict], config: TrainConfig, packing: bool) -> dict:
    """Rows TRL dropped (their completion was truncated away) and rows cut at max_length, logged."""
    kept = len(trainer.train_dataset)
    counts = {"dropped": 0, "truncated": 0}
    if stage == "sft" and not packing:
        counts["dropped"] = len(rows) - kept
        counts["truncated"] = sum(len(ids) >= config.max_length for ids in trainer.train_dataset["input_ids"])
    if counts["dropped"]:
        log.warning("%s: %d of %d examples dropped: their prompt alone reaches max_length=%d (raise max_length)",
                    stage, counts["dropped"], len(rows), config.max_length)
    if counts["truncated"]:
        log.warning("%s: %d examples truncated to max_length=%d tokens", stage, counts["truncated"], config.max_length)
    if stage == "grpo":  # prompts that leave no room for an answer (grpo_datasets logged them)
        counts["dropped"] = len(rows) - kept
    return counts


def preference_trainer(stage: str, config: TrainConfig, common: dict, model, tokenizer, callbacks, datasets):
    """TRL's trainer for a preference stage. DPO and KTO compare with a reference model (the adapter
    switched off, or a frozen copy for full fine-tuning); ORPO and SimPO need none. ORPO and SimPO (TRL's
    CPO with loss_type=simpo and no SFT term) live in trl.experimental in this TRL version."""
    beta = config.stage_beta(stage)
    shared = dict(processing_class=tokenizer, peft_config=lora_config(config), callbacks=callbacks, **datasets)
    if stage == "dpo":
        return DPOTrainer(model=model, ref_model=None,
                          args=DPOConfig(**common, beta=beta, loss_type=[config.dpo_loss_type]), **shared)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # chosen knowingly; the warning would repeat per rank
    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=ORPOConfig(**common, beta=beta), **shared)
    if stage == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=beta, simpo_gamma=config.simpo_gamma)
        return CPOTrainer(model=model, args=args, **shared)
    # KTO's KL term pairs each example with its neighbour in a fixed order: TRL wants sequential batches, so
    # the rows are shuffled once here instead (good and bad examples mixed, reproducibly).
    shared["train_dataset"] = shared["train_dataset"].shuffle(seed=config.seed)
    args = KTOConfig(**{**common, "train_sampling_strategy": "sequential"}, beta=beta)
    return KTOTrainer(model=model, ref_model=None, args=args, **shared)


class MetricsLogCallback(TrainerCallback):
    """Prints metrics as `stage=... step=... key=value` lines (see train.metrics), with tokens/s."""

    def __init__(self, stage: str, tracking: Tracking):
        self.stage, self.tracking = stage, tracking
        self.rate = TokenRate()
        self.rates: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        logs = dict(logs)
        rate = self.rate.update(logs.get("num_tokens"))
        if rate is not None and "loss" in logs:
            logs["tokens_per_second"] = rate
            self.rates.append(rate)
        print(format_log_line(self.stage, state.global_step, logs), flush=True)
        self.tracking.log(self.stage, state.global_step, logs)

    def mean_tokens_per_second(self) -> float | None:
        return sum(self.rates) / len(self.rates) if self.rates else None


class VoiceCallback(TrainerCallback):
    """Voice metrics (train/voice.py) at every evaluation, on the first process: the held-out prompts are
    answered, scored against the person's real answers, added to the evaluation's metrics (so early
    stopping and the best checkpoint may use them) and printed as their own metric line. Skipped under
    ZeRO-3 and FSDP, where no one process holds the whole model to generate with."""

    def __init__(self, stage: str, tokenizer, eval_rows: list[dict], config: TrainConfig, enabled: bool,
                 tracking: Tracking, bf16: bool):
        self.stage, self.tokenizer, self.config, self.tracking, self.bf16 = stage, tokenizer, config, tracking, bf16
        count = config.voice_eval_prompts if enabled else 0
        self.prompts, self.references = held_out_prompts(eval_rows, count)
        self.before: dict | None = None
        self.after: dict | None = None
        self.samples: list[dict] = []
        self.sampling = None  # as the endpoint samples the stage's starting model, from config.seed every time

    def measure(self, model) -> dict:
        if self.sampling is None:
            self.sampling = serving_sampling(getattr(model, "generation_config", None), self.config.seed)
        with bf16_compute(self.bf16):
            scores, answers = measure(model, self.tokenizer, self.prompts, self.references,
                                      self.config.voice_max_new_tokens, self.sampling)
        if not self.samples:
            self.samples = [{"prompt": p[-1]["content"], "reference": r, "before": a}
                            for p, r, a in zip(self.prompts, self.references, answers)]
        else:
            for sample, answer in zip(self.samples, answers):
                sample["after"] = answer
        return scores

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.prompts or metrics is None or model is None:
            return
        scores = {}
        if state.is_world_process_zero:
            scores = self.measure(model)
            self.after = scores
            print(format_log_line(self.stage, state.global_step, scores), flush=True)
            self.tracking.log(self.stage, state.global_step, scores)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank decides alike
            shared = [scores]
            torch.distributed.broadcast_object_list(shared, src=0)
            scores = shared[0]
        # the Trainer and early stopping look metric_for_best_model up as eval_<name>
        metrics.update({f"eval_{name}": value for name, value in scores.items()})

    def report(self) -> dict:
        """The measures before and after, a few samples (the person's writing: pipeline.published drops them
        under keep_writing_private), how the answers were sampled and which held-out rows were measured."""
        sampling = self.sampling.report() if self.sampling else {}
        sampling["max_new_tokens"] = self.config.voice_max_new_tokens
        return {"before": {**(self.before or {})}, "after": self.after, "samples": self.samples[:3],
                "sampling": sampling, "prompts_digest": prompts_digest(self.prompts, self.references)}
