"""Every /opt/ml path and config file SageMaker gives a container, rooted at one overridable directory.

SageMaker mounts everything under /opt/ml. `SAGEMAKER_BASE_DIR` (the name both AWS toolkits use) moves
the root, so `train` and `serve` run as plain processes against a temporary tree in tests and locally.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
DEFAULT_ROOT = "/opt/ml"
BIND_TO_PORT_ENV = "SAGEMAKER_BIND_TO_PORT"
DEFAULT_PORT = 8080
MODEL_SERVER_WORKERS_ENV = "SAGEMAKER_MODEL_SERVER_WORKERS"
MODEL_SERVER_TIMEOUT_ENV = "SAGEMAKER_MODEL_SERVER_TIMEOUT"
# Stateful sessions, named as AWS's model-hosting-container-standards library names them.
STATEFUL_SESSIONS_ENV = "SAGEMAKER_ENABLE_STATEFUL_SESSIONS"
SESSIONS_EXPIRATION_ENV = "SAGEMAKER_SESSIONS_EXPIRATION"
SESSIONS_PATH_ENV = "SAGEMAKER_SESSIONS_PATH"
FAILURE_REASON_LIMIT = 1024  # DescribeTrainingJob.FailureReason keeps this many characters

# Hyperparameters the SageMaker SDKs add for their own toolkits; they are not ours to interpret.
_RESERVED_PREFIXES = ("sagemaker_", "_tuning_objective_metric")


class ContractError(Exception):
    """A SageMaker input (config file, channel) is missing or malformed: the user's to fix."""


@dataclass(frozen=True)
class ResourceConfig:
    current_host: str
    hosts: tuple[str, ...]
    network_interface_name: str | None


@dataclass(frozen=True)
class OptML:
    root: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "OptML":
        return cls(Path(environ.get(BASE_DIR_ENV) or DEFAULT_ROOT))

    # --- paths -------------------------------------------------------------------------------------
    @property
    def input_config_dir(self) -> Path:
        return self.root / "input" / "config"

    @property
    def hyperparameters_file(self) -> Path:
        return self.input_config_dir / "hyperparameters.json"

    @property
    def resource_config_file(self) -> Path:
        return self.input_config_dir / "resourceconfig.json"

    @property
    def input_data_config_file(self) -> Path:
        return self.input_config_dir / "inputdataconfig.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "input" / "data"

    def channel(self, name: str) -> Path:
        return self.data_dir / name

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def model_staging_dir(self) -> Path:
        """Where `train` writes the model before moving it into `model_dir` (same filesystem)."""
        return self.root / "model.partial"

    @property
    def tensorboard_dir(self) -> Path:
        """/opt/ml/output/tensorboard: the default LocalPath of a job's TensorBoardOutputConfig, which SageMaker
        uploads to its S3OutputPath while the job runs."""
        return self.output_dir / "tensorboard"

    @property
    def checkpoints_dir(self) -> Path:
        """/opt/ml/checkpoints, or the LocalPath of the job's CheckpointConfig (input/config/checkpointconfig.json),
        which is the folder SageMaker syncs with S3. A LocalPath under /opt/ml follows SAGEMAKER_BASE_DIR."""
        config = _read_json_object(self.input_config_dir / "checkpointconfig.json", missing={})
        local = config.get("LocalPath") if isinstance(config, dict) else None
        if not local:
            return self.root / "checkpoints"
        path = Path(local)
        if path.is_relative_to(DEFAULT_ROOT):
            return self.root / path.relative_to(DEFAULT_ROOT)
        return path

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    # --- config files ------------------------------------------------------------------------------
    def read_hyperparameters(self) -> dict[str, str]:
        """The raw string map from hyperparameters.json, without the SDKs' reserved keys.

        Decoding to typed values is `container.config.coerce`'s job, because it needs the type.
        A missing file means no hyperparameters (a local run)."""
        raw = _read_json_object(self.hyperparameters_file, missing={})
        return {
            str(k): v if isinstance(v, str) else json.dumps(v)
            for k, v in raw.items()
            if not str(k).startswith(_RESERVED_PREFIXES)
        }

    def read_resource_config(self) -> ResourceConfig:
        """resourceconfig.json, or a single local host when the file is absent."""
        raw = _read_json_object(self.resource_config_file, missing=None)
        if raw is None:
            return ResourceConfig(current_host="algo-1", hosts=("algo-1",), network_interface_name=None)
        try:
            hosts = tuple(str(h) for h in raw["hosts"])
            current = str(raw["current_host"])
        except (KeyError, TypeError) as e:
            raise ContractError(f"{self.resource_config_file}: missing or malformed key {e}") from e
        if current not in hosts:
            raise ContractError(f"{self.resource_config_file}: current_host {current!r} is not in hosts {list(hosts)}")
        return ResourceConfig(current, hosts, raw.get("network_interface_name"))

    def read_input_data_config(self) -> dict[str, dict]:
        """inputdataconfig.json per channel, or the channel folders present when the file is absent."""
        raw = _read_json_object(self.input_data_config_file, missing=None)
        if raw is None:
            return {name: {} for name in self.channels_present()}
        return {str(k): (v if isinstance(v, dict) else {}) for k, v in raw.items()}

    def channels_present(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name for p in self.data_dir.iterdir() if p.is_dir())

    def require_channel(self, name: str) -> Path:
        path = self.channel(name)
        if not path.is_dir():
            present = self.channels_present()
            raise ContractError(
                f"input channel '{name}' is missing: expected a folder {path} "
                f"(channels present: {', '.join(present) or 'none'}); pass it as the '{name}' input of the training job"
            )
        return path

    # --- failure -----------------------------------------------------------------------------------
    def write_failure(self, first_line: str, details: str = "") -> str:
        """Write output/failure: a short actionable first line, then details, within SageMaker's 1024
        characters (FailureReason keeps only those). Returns what was written."""
        text = first_line.strip().replace("\n", " ")
        if details.strip():
            text += "\n" + details.strip()
        text = text[:FAILURE_REASON_LIMIT]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.failure_file.write_text(text, encoding="utf-8")
        return text


def serving_port(environ: Mapping[str, str] = os.environ) -> int:
    """Port to listen on: SAGEMAKER_BIND_TO_PORT in multi-container endpoints, else 8080."""
    raw = environ.get(BIND_TO_PORT_ENV)
    if not raw:
        return DEFAULT_PORT
    try:
        return int(raw)
    except ValueError as e:
        raise ContractError(f"{BIND_TO_PORT_ENV}={raw!r} is not a port number") from e


def _read_json_object(path: Path, missing):
    if not path.exists():
        return missing
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(value, dict):
        raise ContractError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
