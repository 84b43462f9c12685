"""Experiment tracking (report_to): the job's hyperparameters, every number its metric lines carry
(training, evaluation, voice) and at the end the model card and training report, sent to each tracker named.

- tensorboard: event files in /opt/ml/output/tensorboard/<stage>, where the job's TensorBoardOutputConfig
  uploads them from (written by tensorboardX: no TensorFlow).
- mlflow: a run on MLFLOW_TRACKING_URI: a SageMaker managed MLflow tracking-server ARN (the sagemaker-mlflow
  plugin signs the requests with the job's role) or any tracking server or store, in the experiment
  MLFLOW_EXPERIMENT_NAME (default llm-twin). Metrics are sent in the background, not in the training loop;
  a request gives up after MLFLOW_HTTP_REQUEST_MAX_RETRIES (default here 3) tries of
  MLFLOW_HTTP_REQUEST_TIMEOUT (default here 20) seconds.
- wandb: a run in WANDB_PROJECT (default llm-twin) with WANDB_API_KEY, or WANDB_MODE=offline. Its local
  files go to /opt/ml/output/data/wandb, which SageMaker uploads with the job's output (`wandb sync` them).

One run per job, opened by the first process only; stages prefix the names (sft/train/loss, dpo/eval/loss).
A spot job that restarts (the same training job) continues its MLflow and W&B runs: their ids are kept
with the checkpoints. A tracker that cannot start fails the job at once, not after the training (a restart
drops it with a warning instead: the work so far is worth more); one that fails later is dropped with a
warning and the training goes on. Credentials stay in the environment, read by each tracker's own client,
and are never logged: a tracking URI holding a password is refused (MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD carry one).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from container.config import URI_WITH_PASSWORD, ConfigError
from container.opt_ml import OptML
from train.errors import TrainingInterrupted
from train.metrics import log_fields, metric_name

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "llm-twin"  # the MLflow experiment and the W&B project, unless the environment names one
STATE_FILE = "tracking.json"  # in the checkpoints folder: the run ids a restarted job continues


def check_environment(report_to: tuple[str, ...], environ=os.environ) -> None:
    """Refuse, before any work, a tracker whose address or key is missing, or a URI that would show a password."""
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in report_to and not uri:
        raise ConfigError("report_to=mlflow needs MLFLOW_TRACKING_URI: a SageMaker managed MLflow tracking-server ARN "
                          "(launch train --mlflow ARN sets it) or a tracking server's URI")
    if "mlflow" in report_to and URI_WITH_PASSWORD.search(uri):
        raise ConfigError("MLFLOW_TRACKING_URI holds a user and password, which would show wherever the URI is "
                          "logged: put them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if ("wandb" in report_to and not environ.get("WANDB_API_KEY")
            and environ.get("WANDB_MODE") not in ("offline", "disabled")):
        raise ConfigError("report_to=wandb needs WANDB_API_KEY in the job's environment (launch train --wandb passes "
                          "yours), or WANDB_MODE=offline to write the run to the job's output for `wandb sync`")


class TensorBoard:
    name = "tensorboard"
    run_id = None

    def __init__(self, root: Path, params: dict):
        self.root, self.params, self.writers = root, params, {}

    def _writer(self, stage: str):
        if stage not in self.writers:
            from tensorboardX import SummaryWriter

            # SageMaker uploads as they grow
            self.writers[stage] = SummaryWriter(log_dir=str(self.root / stage), flush_secs=30)
            self.writers[stage].add_text("hyperparameters", "```\n" + json.dumps(self.params, indent=1) + "\n```", 0)
        return self.writers[stage]

    def log(self, stage: str, step: int, metrics: dict) -> None:
        writer = self._writer(stage)
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)

    def files(self, paths: list[Path]) -> None:
        card = next((path for path in paths if path.suffix == ".md"), None)
        if card is not None and self.writers:  # with the stage that made the model, which TensorBoard renders
            list(self.writers.values())[-1].add_text("model_card", card.read_text(encoding="utf-8"), 0)

    def close(self, outcome: str) -> None:
        for writer in self.writers.values():
            writer.close()


class MLflow:
    name = "mlflow"
    STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}

    def __init__(self, run_name: str, params: dict, resume: str | None):
        import mlflow

        self.mlflow, self.pending = mlflow, []
        uri = os.environ["MLFLOW_TRACKING_URI"]
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # MLflow's own: 7 tries of 120 s each
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if not uri.startswith("arn:"):  # sagemaker-mlflow's header plugin warns on every request to other servers
            logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT)
        run = None
        if resume:
            try:
                run = mlflow.start_run(run_id=resume)
            except mlflow.exceptions.MlflowException as e:
                log.warning("mlflow: run %s cannot be continued (%s): starting a new one", resume, e)
        if run is None:
            run = mlflow.start_run(run_name=run_name)
            mlflow.log_params(params)
        self.run_id = run.info.run_id
        log.info("mlflow: run %s (%s) in experiment '%s' at %s", self.run_id, run_name, experiment.name, uri)

    def log(self, stage: str, step: int, metrics: dict) -> None:
        for future in [f for f in self.pending if f.done()]:  # the background sends so far: raise their failure
            self.pending.remove(future)
            future.result()
        operations = self.mlflow.log_metrics({f"{stage}/{name}": value for name, value in metrics.items()}, step=step,
                                             synchronous=False)
        self.pending += operations._operation_futures if operations else []

    def files(self, paths: list[Path]) -> None:
        for path in paths:
            self.mlflow.log_artifact(str(path))

    def close(self, outcome: str) -> None:
        self.mlflow.end_run(status=self.STATUS[outcome])  # waits for the metrics still being sent


class WandB:
    name = "wandb"

    def __init__(self, run_name: str, params: dict, resume: str | None, directory: Path):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        # sagemaker_disable: W&B's SageMaker integration would replace the run id (so a restart could not
        # continue the run) and add the raw hyperparameters.json to the config
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=run_name, config=params,
                              id=resume, resume="allow" if resume else None, dir=str(directory),
                              settings=wandb.Settings(sagemaker_disable=True))
        self.run_id, self.defined = self.run.id, set()
        log.info("wandb: run %s (%s) in project '%s'%s", self.run_id, run_name, self.run.project,
                 f", offline in {directory}" if self.run.offline else f" at {self.run.url}")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        named = {f"{stage}/{name}": value for name, value in metrics.items()}
        for name in set(named) - self.defined:  # each stage counts its own steps: its own x-axis
            self.run.define_metric(name, step_metric=f"{stage}/step")
            self.defined.add(name)
        self.run.log({f"{stage}/step": step, **named})

    def files(self, paths: list[Path]) -> None:
        for path in paths:  # copied into the run's folder: saving would link to /opt/ml/model, which an offline
                            # run's folder (uploaded with the job's output, synced later) does not have
            copy = Path(self.run.dir) / path.name
            shutil.copy2(path, copy)
            self.run.save(str(copy), base_path=self.run.dir, policy="now")

    def close(self, outcome: str) -> None:
        if outcome == "stopped":
            self.run.mark_preempting()
        self.run.finish(exit_code={"finished": 0, "failed": 1, "stopped": 143}[outcome])


class Tracking:
    """The trackers report_to names, on the first process (elsewhere: none). Each call reaches every
    tracker; one that fails is dropped with a warning, so tracking never ends a training."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, stage: str, step: int, logs: dict) -> None:
        metrics = {metric_name(field): float(value) for field, value in log_fields(logs).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if metrics:
            self._each("log", stage, step, metrics)

    def files(self, paths: list[Path]) -> None:
        self._each("files", [path for path in paths if path.is_file()])

    def close(self, outcome: str) -> None:
        self._each("close", outcome)

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                log.warning("report_to=%s failed (%s: %s): it gets nothing more from this job", tracker.name,
                            type(e).__name__, e)
                self.trackers.remove(tracker)
                if method != "close":
                    try:  # best effort: the run shows as failed, not as finished by the client's exit handler
                        tracker.close("failed")
                    except Exception:
                        pass


@contextmanager
def tracked(report_to: tuple[str, ...], paths: OptML, params: dict) -> Iterator[Tracking]:
    """Open the trackers (on the first process), and close them with the job's outcome: finished,
    failed, or stopped (a SIGTERM: W&B marks it preempted, MLflow killed; the restarted job continues it)."""
    names = [name for name in report_to if name != "none"]
    if not names or int(os.environ.get("RANK", "0")) != 0:
        yield Tracking([])
        return
    job = os.environ.get("TRAINING_JOB_NAME", "")  # SageMaker's, the same across a spot job's restarts
    state_file = paths.checkpoints_dir / STATE_FILE
    saved = _read_state(state_file)
    resume = saved if saved.get("job") == job else {}
    run_name = job or f"{DEFAULT_PROJECT}-{params.get('method', 'run')}"
    tracking = Tracking([])
    for name in names:
        try:
            if name == "tensorboard":
                tracker = TensorBoard(paths.tensorboard_dir, params)
            elif name == "mlflow":
                tracker = MLflow(run_name, params, resume.get(name))
            else:
                tracker = WandB(run_name, params, resume.get(name), paths.output_dir / "data")
        except Exception as e:
            if resume:  # a restarted job: the training so far is worth more than the tracking
                log.warning("report_to=%s could not continue its run (%s: %s): the job goes on without it", name,
                            type(e).__name__, e)
                continue
            tracking.close("failed")
            raise ConfigError(f"report_to={name} could not start a run: {type(e).__name__}: {e}") from e
        except TrainingInterrupted:
            tracking.close("stopped")
            raise
        tracking.trackers.append(tracker)
        _write_state(state_file, {"job": job, **{t.name: t.run_id for t in tracking.trackers if t.run_id}})
    outcome = "failed"
    try:
        yield tracking
        outcome = "finished"
    except TrainingInterrupted:
        outcome = "stopped"
        raise
    finally:
        tracking.close(outcome)


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): new tracking runs are started", path, e)
        return {}


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(state) + "\n")
    partial.rename(path)
