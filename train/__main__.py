"""`train`: the SageMaker training job. Reads /opt/ml, fine-tunes, writes /opt/ml/model.

This is the one exception boundary of the training side: every error ends here, becomes a short,
actionable first line in output/failure (SageMaker shows its first 1024 characters as FailureReason)
and a non-zero exit. Config and data errors are checked before torch loads, so they fail in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import traceback

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError, OptML
from container.telemetry import turn_off_telemetry
from train.config import TrainConfig
from train.data import DataError, load_kto_rows, load_preference_rows, load_sft_rows, split_rows
from train.documents import read_documents, split_documents
from train.instructions import Corpus, require_enough
from train.errors import EXIT_FRAMEWORK_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR, TrainingInterrupted
from train.launcher import BASE_REVISION_ENV, WORKER_ENV, launch, topology, write_rank_failure
from train.model import check_answer_room, recorded_commit, resolve_base_model
from train.stop import Stop
from train.tracking import check_environment

log = logging.getLogger("train")

USER_ERRORS = (ConfigError, ContractError, DataError, ModelDirError)

# stage -> (training channel, validation channel, loader)
CHANNELS = {"sft": ("train", "validation", load_sft_rows),
            "dpo": ("preference", "preference_validation", load_preference_rows),
            "orpo": ("preference", "preference_validation", load_preference_rows),
            "simpo": ("preference", "preference_validation", load_preference_rows),
            "kto": ("preference", "preference_validation", load_kto_rows),
            "grpo": ("train", "validation", load_sft_rows)}  # prompts, and the person's answers for the rewards


DOCUMENTS_CHANNEL = "documents"  # instructions=auto: the person's writing (else the `train` channel holds it)


def stage_channels(config: TrainConfig, stage: str) -> tuple:
    """preference=auto: a preference stage reads the person's own writing, the SFT channels; its pairs are
    built in the job (train/preferences.py)."""
    if config.preference == "auto" and stage != "sft":
        return CHANNELS["sft"]
    return CHANNELS[stage]


def check_job_shape(paths: OptML) -> None:
    """Refuse job shapes this version cannot run correctly, before any work is done."""
    hosts = paths.read_resource_config().hosts
    for channel, settings in paths.read_input_data_config().items():
        if settings.get("TrainingInputMode") == "Pipe":
            raise ContractError(f"the '{channel}' channel uses Pipe input mode; use File or FastFile")
        if settings.get("S3DistributionType") == "ShardedByS3Key" and len(hosts) > 1:
            raise ContractError(
                f"the '{channel}' channel is ShardedByS3Key: each of the {len(hosts)} instances would read different "
                "files and run a different number of steps, and the ranks would wait on each other forever; use "
                "FullyReplicated (every instance reads all of it, and the trainer gives each rank its own share)")


def load_data(config: TrainConfig, paths: OptML) -> tuple[dict[str, tuple[list, list]], Corpus | None]:
    """Per stage: training rows, and evaluation rows from the validation channel or a held-out split. With
    instructions=auto, the stages that read the `train` channel get their rows in the job (from the corpus)."""
    corpus = load_corpus(config, paths) if config.instructions == "auto" else None
    data = {}
    for stage in config.stages:
        train_channel, eval_channel, load = stage_channels(config, stage)
        if corpus is not None and train_channel == "train":
            continue
        rows = load(paths.require_channel(train_channel))
        if paths.channel(eval_channel).is_dir():
            train_rows, eval_rows = rows, load(paths.channel(eval_channel))
            source = f"the '{eval_channel}' channel"
        else:
            train_rows, eval_rows = split_rows(rows, config.validation_split, config.seed)
            source = f"validation_split={config.validation_split}"
        log.info("%s: %d training examples from '%s', %d for evaluation (%s)",
                 stage, len(train_rows), train_channel, len(eval_rows), source)
        _require_eval_rows(config, stage, eval_channel, eval_rows)
        data[stage] = (train_rows, eval_rows)
    used = {"model"} | {name for stage in config.stages for name in stage_channels(config, stage)[:2]}
    if corpus is not None:
        used |= {corpus.channel, "teacher"}
    for name in sorted(set(paths.channels_present()) - used):
        log.warning("channel '%s' is present but method=%s does not read it", name, config.method)
    return data, corpus


def load_corpus(config: TrainConfig, paths: OptML) -> Corpus:
    """instructions=auto: the person's writing, cleaned and split into passages (train/documents.py); whole
    documents held out for the voice, unless a `validation` channel holds evaluation rows."""
    channel = DOCUMENTS_CHANNEL if paths.channel(DOCUMENTS_CHANNEL).is_dir() else "train"
    documents, skipped = read_documents(paths.require_channel(channel), config.passage_max_tokens)
    for line in skipped:
        log.warning("instructions=auto: skipped %s/%s", channel, line)
    if paths.channel("validation").is_dir():
        corpus = Corpus(channel, documents, [], load_sft_rows(paths.channel("validation")))
        held = f"evaluation rows from the 'validation' channel ({len(corpus.validation_rows)})"
    else:
        train, held_out = split_documents(documents, config.validation_split, config.seed)
        corpus = Corpus(channel, train, held_out)
        held = (f"{len(held_out)} whole documents ({corpus.count(held_out)} passages) held out for evaluation "
                f"(validation_split={config.validation_split})")
    require_enough(corpus.count(corpus.train), config.per_device_train_batch_size * config.gradient_accumulation_steps,
                   f"the '{channel}' channel ({len(documents)} documents, {len(skipped)} skipped)")
    log.info("instructions=auto: %d documents in '%s' (%d skipped) gave %d passages of at most %d tokens; %d "
             "documents to train on; %s", len(documents) + len(skipped), channel, len(skipped),
             corpus.count(documents), config.passage_max_tokens, len(corpus.train), held)
    for stage in config.stages:
        if stage_channels(config, stage)[0] == "train":
            _require_eval_rows(config, stage, "validation", corpus.validation_rows or corpus.held_out)
    return corpus


def _require_eval_rows(config: TrainConfig, stage: str, eval_channel: str, eval_rows: list) -> None:
    if (config.early_stopping_patience or config.load_best_model_at_end) and not eval_rows:
        raise ConfigError(f"early_stopping_patience/load_best_model_at_end compare evaluations, but {stage} has no "
                          f"held-out data: add a '{eval_channel}' channel or set validation_split > 0")
    if config.eval_steps and not eval_rows:  # asked for: not switched off without a word
        raise ConfigError(f"eval_steps={config.eval_steps} asks for evaluations, but {stage} has no held-out data: "
                          f"add a '{eval_channel}' channel, set validation_split > 0 (on enough rows to hold one "
                          "back), or set eval_steps=0")


class WorkersFailed(Exception):
    """Launched workers failed; their launcher reports them as this instance's failure."""

    def __init__(self, code: int, first_line: str, details: str):
        super().__init__(first_line)
        self.code, self.first_line, self.details = code, first_line, details


def run(config: TrainConfig, paths: OptML, worker: bool, stop: Stop) -> None:
    log.info("config: %s", json.dumps(config.__dict__, default=list, sort_keys=True))
    check_environment(config.report_to)
    with stop.phase("reading the data"):
        check_job_shape(paths)
        data, corpus = load_data(config, paths)
    with stop.phase("getting the base model (download or extraction)"):
        pinned = os.environ.get(BASE_REVISION_ENV) if worker else recorded_commit(config, paths.checkpoints_dir)
        base = resolve_base_model(config, paths, pinned=pinned)
    if config.export == "adapter" and base.reference is None:
        raise ConfigError("export=adapter needs a base model the endpoint can load by itself (a hub model_id or the "
                          "embedded model), not a local or channel model: use export=merged or export=both")
    log.info("base model: %s%s", base.source, f" at commit {base.revision}" if base.revision else "")
    with stop.phase("counting the GPUs (loading torch)"):
        top = topology(config, paths)
    check_answer_room(config, base)
    # config and data are fine: start the workers (DeepSpeed wants torchrun's rendezvous even for one process)
    if (top.needs_launcher or config.distributed in ("zero2", "zero3")) and not worker:
        with stop.phase("starting the training processes"):
            code, failure = launch(config, top, base.revision)
        if code != 0:
            raise WorkersFailed(code, *failure)
        return

    with stop.phase("loading the training libraries"):
        from train.pipeline import fine_tune  # torch from here on

    fine_tune(config, paths, data, base, stop, corpus)


def main() -> None:
    stop = Stop().install()  # first: from here a SIGTERM ends in the failure file and exit 143
    turn_off_telemetry()  # before any library loads (and inherited by the launched workers)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # one held by the entrypoint arrives now
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    paths = OptML.from_env()
    worker = os.environ.get(WORKER_ENV) == "1"  # one of several processes started by the launcher
    try:
        with stop.phase("reading the configuration"):  # raises a SIGTERM that came before it
            if not worker:
                paths.failure_file.unlink(missing_ok=True)  # a local re-run must not show an earlier run's failure
            config = TrainConfig.from_hyperparameters(paths.read_hyperparameters())
        with stop.phase("running the job"):
            run(config, paths, worker, stop)
    except WorkersFailed as e:
        _fail(paths, worker, e.code, e.first_line, e.details)
    except USER_ERRORS as e:
        _fail(paths, worker, EXIT_USER_ERROR, str(e))
    except TrainingInterrupted as e:
        _fail(paths, worker, EXIT_INTERRUPTED, str(e))
    except Exception as e:  # the boundary: anything else is a framework error, reported with its traceback
        details = traceback.format_exc()
        log.error("%s", details)
        _fail(paths, worker, EXIT_FRAMEWORK_ERROR, f"training failed: {type(e).__name__}: {e}", details[-700:])
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the work is done: a SIGTERM now (even while the interpreter
    log.info("training complete")                  # shuts down, which restores default handlers) changes nothing


def _fail(paths: OptML, worker: bool, code: int, message: str, details: str = "") -> None:
    """A worker reports to its launcher, which writes this host's failure file; otherwise write it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the report short
    shutil.rmtree(paths.model_staging_dir, ignore_errors=True)
    if worker:
        write_rank_failure(f"{message}\n{details}".strip(), code)
    else:
        paths.write_failure(message, details)
    log.error("%s", message)
    sys.exit(code)


if __name__ == "__main__":
    main()
