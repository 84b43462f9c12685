"""`train`: the SageMaker training job. Reads /opt/ml, fine-tunes, writes /opt/ml/model.

This is the one exception boundary of the training side: every error ends here, becomes a short,
actionable first line in output/failure (SageMaker shows its first 1024 characters as FailureReason)
and a non-zero exit. Config and data errors are checked before torch loads, so they fail in seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import traceback

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError, OptML
from train.config import TrainConfig
from train.data import DataError, load_sft_rows
from train.model import resolve_base_model

log = logging.getLogger("train")

USER_ERRORS = (ConfigError, ContractError, DataError, ModelDirError)
EXIT_USER_ERROR = 2
EXIT_FRAMEWORK_ERROR = 1


def check_job_shape(paths: OptML) -> None:
    """Refuse job shapes this version cannot run correctly, before any work is done."""
    hosts = paths.read_resource_config().hosts
    if len(hosts) > 1:
        raise ContractError(f"this job has {len(hosts)} instances ({', '.join(hosts)}); multi-instance training "
                            "is not supported by this version: set instance_count=1")
    mode = paths.read_input_data_config().get("train", {}).get("TrainingInputMode", "File")
    if mode == "Pipe":
        raise ContractError("the 'train' channel uses Pipe input mode; use File or FastFile")


def run(config: TrainConfig, paths: OptML) -> None:
    log.info("config: %s", json.dumps(config.__dict__, default=list, sort_keys=True))
    check_job_shape(paths)
    rows = load_sft_rows(paths.require_channel("train"))
    log.info("%d training examples from %s", len(rows), paths.channel("train"))
    base_model = resolve_base_model(config, paths)
    log.info("base model: %s", base_model)

    from train import export, model, sft  # torch from here on

    device = sft.device_settings(config)
    base, tokenizer = model.load_base_model(base_model, config, device["dtype"])
    started = time.monotonic()
    peft_model, result = sft.train_sft(
        config, base, tokenizer, rows, str(paths.checkpoints_dir), use_cpu=device["use_cpu"], bf16=device["bf16"]
    )
    training = {
        "method": config.method,
        "adapter": config.adapter,
        "examples": len(rows),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "seconds": round(time.monotonic() - started, 1),
    }
    export.export_merged(peft_model, tokenizer, config, base_model, paths, training)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    paths = OptML.from_env()
    try:
        config = TrainConfig.from_hyperparameters(paths.read_hyperparameters())
        run(config, paths)
    except USER_ERRORS as e:
        shutil.rmtree(paths.model_staging_dir, ignore_errors=True)
        paths.write_failure(str(e))
        log.error("training failed: %s", e)
        sys.exit(EXIT_USER_ERROR)
    except Exception as e:  # the boundary: anything else is a framework error, reported with its traceback
        shutil.rmtree(paths.model_staging_dir, ignore_errors=True)
        details = traceback.format_exc()
        paths.write_failure(f"training failed: {type(e).__name__}: {e}", details[-700:])
        log.error("training failed:\n%s", details)
        sys.exit(EXIT_FRAMEWORK_ERROR)
    log.info("training complete")


if __name__ == "__main__":
    main()
