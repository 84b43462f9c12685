"""The training stages, one TRL trainer each: SFT (SFTTrainer, loss on completions only) and the preference
stages DPO (DPOTrainer), ORPO (ORPOTrainer), SimPO (CPOTrainer with loss_type=simpo and no SFT term) and KTO
(KTOTrainer, unpaired good and bad examples). DPO and KTO compare with a reference model: the PEFT base with
the adapter disabled (no second model copy), or a frozen copy for full fine-tuning; ORPO and SimPO need none.
GRPO (GRPOTrainer, built in train/grpo.py) samples answers to the person's prompts and rewards those that read
as the person's (train/rewards.py). LoRA, QLoRA or full.

Imports torch and TRL: `train.__main__` imports this only after config and data are checked.
"""

from __future__ import annotations

import logging
import os
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
from train.checkpoints import (MarkComplete, Markers, StopAtNextMicroBatch, newest_saved, on_first_process,
                               resume_checkpoint)
from train.config import TrainConfig
from train.distributed import distributed_args, strategy, world_size
from train.errors import TrainingInterrupted
from train.metrics import TokenRate, format_log_line
from train.plan import (Device, check_checkpoint_space, check_fits, planned_steps, use_gradient_checkpointing,
                        use_packing)
from train.grpo import check_grpo, grpo_datasets, grpo_report, grpo_trainer
from train.stop import Stop
from train.tracking import Tracking
from train.voice import bf16_compute, held_out_prompts, measure, prompts_digest, serving_sampling

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = ("voice_overlap",)


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
