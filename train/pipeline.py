"""The job's stages end to end: load the base, run SFT and/or DPO, merge, export. Imports torch.

Between stages the merged 16-bit model is kept in /opt/ml/checkpoints/<stage>/final, marked complete,
so a restarted sft+dpo job skips a finished SFT stage and resumes inside the DPO stage.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from container.model_dir import TRAINING_REPORT_FILE
from container.opt_ml import OptML
from train.checkpoints import Markers, claim, is_complete, mark_complete
from train.config import TrainConfig
from train.data import content_name, read_jsonl, to_sft_row, write_jsonl
from train.export import MODEL_CARD_FILE, export_model
from train.instructions import INSTRUCTIONS_FILE, VALIDATION_FILE, Corpus, digest, max_model_len, require_enough, select
from train.model import (TEACHER_CHANNEL, BaseModel, load_for_training, load_tokenizer, load_trained,
                         resolve_teacher)
from train.preferences import PAIRS_FILE, build_pairs, kto_rows, rows_digest
from train.distributed import log_partition, planned_strategy, sharded_loading, start_processes
from train.plan import detect_device, weights_dtype
from train.recipes import RunContext, StageRows, train_stage
from train.stop import Stop
from train.teacher import engine_name, write_instructions
from train.tracking import Tracking, tracked
from train.voice import bf16_compute

log = logging.getLogger(__name__)

STAGE_REPORT_FILE = "stage_report.json"


def fine_tune(config: TrainConfig, paths: OptML, data: dict[str, tuple[list, list]], base: BaseModel,
              stop: Stop, corpus: Corpus | None = None) -> None:
    device = detect_device(config)
    report = start_report(config, base, device)
    claim(paths.checkpoints_dir, training_identity(config, base, data, corpus), write=_rank("LOCAL_RANK") == 0)
    if corpus is not None:
        with stop.phase("writing the instructions (instructions=auto)"):
            rows, report["instructions"] = instruction_rows(config, paths, corpus, base)
        data = {**data, **{stage: rows for stage in config.stages if stage not in data}}
    with stop.phase("loading the tokenizer"):
        tokenizer = load_tokenizer(base.source, config, base.revision)
    params = {**{k: ",".join(v) if isinstance(v, tuple) else v for k, v in report["config"].items()},
              "base_model": base.reference or base.source, "device": report["device"], "precision": report["precision"]}
    if base.revision:
        params["base_model_revision"] = base.revision
    with tracked(config.report_to, paths, params) as tracking:
        _train_stages(config, paths, data, base, stop, device, tokenizer, report, tracking)


def training_identity(config: TrainConfig, base: BaseModel, data: dict[str, tuple[list, list]],
                      corpus: Corpus | None = None) -> dict:
    """What checkpoints must have been trained on to be resumed (train/checkpoints.py claim): the rows each stage
    reads from its channels, or for instructions=auto the passages its rows are written from (written again on a
    restart, they need not come out identical). A base without a hub reference is named by its content."""
    named = base.reference or content_name(Path(base.source))
    digests = {stage: [rows_digest(train), rows_digest(held_out)] for stage, (train, held_out) in data.items()}
    if corpus is not None:
        digests["documents"] = [rows_digest(corpus.passages()), rows_digest(corpus.validation_rows or [])]
    return {"base_model": named, "model_revision": config.model_revision, "base_model_revision": base.revision,
            "method": config.method, "adapter": config.adapter,
            "lora": [config.lora_r, config.lora_alpha, list(config.lora_target_modules)], "data": digests}


def start_report(config: TrainConfig, base: BaseModel, device) -> dict:
    """The training report before its stages: the config, the base and its hub commit (None for a folder)."""
    return {
        "config": dataclasses.asdict(config),
        "base_model": base.source,
        "base_model_revision": base.revision,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "precision": "bf16" if device.bf16 else "fp32",
        "stages": {},
    }


def _train_stages(config: TrainConfig, paths: OptML, data: dict[str, tuple[list, list]], base: BaseModel, stop: Stop,
                  device, tokenizer, report: dict, tracking: Tracking) -> None:
    source = base.source
    extras: dict[str, Path] = {}  # files shipped with the model besides what export writes
    resources = paths.read_resource_config()
    markers = Markers.for_hosts(resources.current_host, resources.hosts)
    run = RunContext(device, stop, markers, tracking, revision=base.revision_of)
    for index, stage in enumerate(config.stages):
        stage_dir = paths.checkpoints_dir / stage
        final = stage_dir / "final"
        last = index == len(config.stages) - 1
        if not last and is_complete(final, markers):
            log.info("stage %s finished in an earlier run: continuing from %s", stage, final)
            report["stages"][stage] = json.loads((final / STAGE_REPORT_FILE).read_text())
            source = str(final)
            continue
        train_rows, eval_rows = data[stage]
        generates = stage != "sft" and config.preference == "auto"  # before training: a whole model, unsharded
        revision = base.revision_of(source)
        planned = planned_strategy(config, source, revision, stage)
        with (stop.phase(f"loading the model for {stage}"),
              nullcontext() if generates else sharded_loading(config, device, stage_dir, source, planned)):
            model = load_for_training(source, config, weights_dtype(config, device, planned),
                                      device.attn_implementation, revision)
        log_partition(model)
        if stage != "sft" and config.preference == "auto":
            with stop.phase(f"building {stage}'s preference pairs (preference=auto)"), bf16_compute(device.bf16):
                train_rows, eval_rows = _auto_pairs(stage, config, model, tokenizer, train_rows, eval_rows, stage_dir)
            extras[PAIRS_FILE] = stage_dir / PAIRS_FILE
        rows = StageRows(train_rows, eval_rows)
        trained, stage_report = train_stage(stage, config, model, tokenizer, rows, stage_dir, run)
        report["stages"][stage] = stage_report
        del model
        _free_memory()
        if last:
            if _rank("RANK") == 0:  # only the first process of the first instance writes /opt/ml/model
                with stop.phase("exporting the model"):
                    export_model(config, paths, tokenizer, base, source, trained, *published(config, report, extras))
                tracking.files([paths.model_dir / MODEL_CARD_FILE, paths.model_dir / TRAINING_REPORT_FILE])
            return
        if _rank("LOCAL_RANK") == 0:  # every instance needs the stage model for the next stage
            with stop.phase(f"merging and saving the {stage} model"):
                merged = load_trained(source, trained, config, base.revision_of(source))
                _save_stage_model(merged, tokenizer, final, stage_report, markers)
            del merged
            _free_memory()
        _barrier()
        source = str(final)


def published(config: TrainConfig, report: dict, extras: dict[str, Path]) -> tuple[dict, dict[str, Path]]:
    """What the model directory gets of the training report and the extra files; the trackers get its model card
    and report. With keep_writing_private, nothing of the person's writing: each stage's voice measures stay, its
    sample answers go (also those of a stage finished by an earlier run), and preference=auto's pairs stay in
    the checkpoints."""
    if not config.keep_writing_private:
        return report, extras
    stages = {stage: _without_samples(values) for stage, values in report["stages"].items()}
    return {**report, "stages": stages}, {name: path for name, path in extras.items() if name != PAIRS_FILE}


def _without_samples(stage_report: dict) -> dict:
    voice = stage_report.get("voice")
    if not voice:
        return stage_report
    return {**stage_report, "voice": {key: value for key, value in voice.items() if key != "samples"}}


def _auto_pairs(stage: str, config: TrainConfig, model, tokenizer, train_rows: list, eval_rows: list,
                stage_dir: Path) -> tuple[list, list]:
    """preference=auto's pairs (train/preferences.py). Every process answers its share of the rows and the
    shares are gathered in row order, so all processes (and instances) train on the same pairs. They are
    written, named after the rows they come from, to the stage's checkpoint folder: a restart on the same
    data reuses them, a restart on changed data builds new ones."""
    from accelerate.utils import broadcast_object_list, gather_object

    state = start_processes(config)
    files = [stage_dir / f"{name}-{rows_digest(rows)}.jsonl"
             for name, rows in (("train", train_rows), ("eval", eval_rows))]
    found = [[read_jsonl(f) for f in files] if state.is_main_process and all(f.is_file() for f in files) else None]
    broadcast_object_list(found)  # the first process's view decides, for every process
    if found[0] is not None:
        pairs = found[0]
    else:
        pairs = []
        for rows in (train_rows, eval_rows):
            share = list(range(state.process_index, len(rows), state.num_processes))
            built = (build_pairs(model, tokenizer, [rows[i] for i in share], config.preference_max_new_tokens)
                     if share else [])
            pairs.append([pair for _, pair in sorted(gather_object([(i, pair) for i, pair in zip(share, built)
                                                                     if pair is not None]), key=lambda item: item[0])])
    if state.is_local_main_process:
        for path, built in zip(files, pairs):
            if not path.is_file():
                write_jsonl(built, path)
        shutil.copy2(files[0], stage_dir / PAIRS_FILE)  # what export ships with the model
    log.info("preference=auto: %d training and %d evaluation pairs from %d and %d rows", len(pairs[0]), len(pairs[1]),
             len(train_rows), len(eval_rows))
    return tuple(kto_rows(p) for p in pairs) if stage == "kto" else tuple(pairs)


def instruction_rows(config: TrainConfig, paths: OptML, corpus: Corpus, base: BaseModel) -> tuple[tuple, dict]:
    """instructions=auto's training and evaluation rows (train/instructions.py) and their counts. The first process
    makes them (or finds them in the checkpoints, from an earlier run on the same documents and teacher) and
    every process trains on its copy. The rows go to /opt/ml/output/data for the person to read, edit and train
    on again (not with keep_writing_private)."""
    from accelerate.utils import broadcast_object_list

    state = start_processes(config)
    shared = [_make_instruction_rows(config, paths, corpus, base) if state.is_main_process else None]
    broadcast_object_list(shared)  # the first process's rows, for every process (and instance)
    train_rows, held_out_rows, counts = shared[0]
    eval_rows = corpus.validation_rows if corpus.validation_rows is not None else held_out_rows
    if state.is_main_process and not config.keep_writing_private:
        output = paths.output_dir / "data"
        write_jsonl(train_rows, output / INSTRUCTIONS_FILE)
        write_jsonl(held_out_rows, output / VALIDATION_FILE)
        log.info("instructions=auto: the rows are in %s (training) and %s (held out)", output / INSTRUCTIONS_FILE,
                 output / VALIDATION_FILE)
    sft_rows = [to_sft_row(row, f"{INSTRUCTIONS_FILE} row {i}") for i, row in enumerate(train_rows)]
    return (sft_rows, [to_sft_row(row, f"{VALIDATION_FILE} row {i}") for i, row in enumerate(eval_rows)]
            if eval_rows is held_out_rows else eval_rows), counts


def _make_instruction_rows(config: TrainConfig, paths: OptML, corpus: Corpus, base: BaseModel):
    teacher = resolve_teacher(config, paths, base)
    key = digest(corpus.train, corpus.held_out, teacher, config.instructions_keep)
    folder = paths.checkpoints_dir / "instructions"
    files = [folder / f"{name}-{key}.jsonl" for name in ("train", "held_out", "counts")]
    if all(f.is_file() for f in files):
        train_rows, held_out_rows, (counts,) = (read_jsonl(f) for f in files)
        log.info("instructions=auto: reusing the %d training and %d held-out rows an earlier run wrote (%s)",
                 len(train_rows), len(held_out_rows), files[0])
        return train_rows, held_out_rows, counts
    started = time.monotonic()
    log.info("instructions=auto: %s writes the instructions of %d passages with %s", teacher.source,
             len(corpus.passages()), engine_name())
    made = write_instructions(teacher, corpus.passages(), max_model_len(config.passage_max_tokens))
    split = corpus.count(corpus.train)
    train_rows, train_counts = select(corpus.train, made[:split], config.instructions_keep)
    held_out_rows, held_out_counts = select(corpus.held_out, made[split:], None)
    name = ("the model in the `teacher` channel" if paths.channel(TEACHER_CHANNEL).is_dir()
            else config.teacher_model_id or "the base model")
    counts = {"teacher": teacher.source, "teacher_name": name, "teacher_revision": teacher.revision,
              "engine": engine_name(),
              "documents": len(corpus.train) + len(corpus.held_out), "held_out_documents": len(corpus.held_out),
              "train": train_counts, "held_out": held_out_counts, "instructions_keep": config.instructions_keep,
              "seconds": round(time.monotonic() - started, 1)}
    log.info("instructions=auto: %d training passages, %d passed the checks (failed: %s), %d kept "
             "(instructions_keep=%s); %d of %d held-out passages passed; %.1f minutes", train_counts["passages"],
             train_counts["passed"], train_counts["failed_checks"] or "none", train_counts["kept"],
             config.instructions_keep, held_out_counts["kept"], held_out_counts["passages"], counts["seconds"] / 60)
    require_enough(len(train_rows), config.per_device_train_batch_size * config.gradient_accumulation_steps,
                   "filtering the instructions")
    for path, rows in zip(files, (train_rows, held_out_rows, [counts])):
        write_jsonl(rows, path)
    return train_rows, held_out_rows, counts


def _rank(name: str) -> int:
    return int(os.environ.get(name, "0"))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save_stage_model(model, tokenizer, final: Path, stage_report: dict, markers: Markers) -> Path:
    partial = final.with_name("final.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / STAGE_REPORT_FILE).write_text(json.dumps(stage_report, indent=2))
    partial.rename(final)
    mark_complete(final, markers)
    log.info("stage model saved to %s", final)
    return final


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
