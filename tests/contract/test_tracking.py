"""report_to=tensorboard,mlflow,wandb through the real `train`: an MLflow local store and an offline W&B
run hold the job's hyperparameters, its training, eval and voice metrics and its model card; a restart of
the same job continues the same runs; no credential reaches a log or a file; with keep_writing_private, none
of the person's held-out writing reaches the model, the output or a tracker."""

import json
import struct

from tests.contract.test_voice import FAST, HELD_OUT
from tests.helpers import TINY_ROWS, jsonl, link_model_channel, make_tree, run_train

SECRETS = {"WANDB_API_KEY": "wandb-key-do-not-log-0123456789abcdef01234567",
           "MLFLOW_TRACKING_TOKEN": "mlflow-token-do-not-log"}


def wandb_records(path):
    """A W&B run file: a 7-byte header (:W&B, magic, version), then LevelDB-log framed protobuf records in
    32 KiB blocks, each piece with a CRC (4 bytes), a length (2) and a type (1: whole, 2-4: first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    blob, offset, piece = path.read_bytes(), 7, b""
    assert blob[:4] == b":W&B"
    while offset + 7 <= len(blob):
        left = 32768 - offset % 32768
        if left < 7:  # a block's tail too short for a header is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", blob[offset:offset + 7])
        if length == 0 and kind == 0:
            offset += left
            continue
        piece += blob[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            yield record
            piece = b""


def read_wandb_run(path):
    config, history, files = {}, [], []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)  # a/b: nested keys
                            for item in record.history.item})
        elif kind == "files":
            files += [f.path for f in record.files.files]
    return config, history, files


def test_mlflow_and_wandb_runs_hold_the_params_metrics_and_model_card_and_a_restart_continues_them(tmp_path, tiny_model,
                                                                                                   monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who ask

    store = tmp_path / "mlruns"
    # SM_TRAINING_ENV: what W&B takes for SageMaker (its integration would replace the run's id)
    env = {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline",
           "TRAINING_JOB_NAME": "twin-job-1", "SM_TRAINING_ENV": "{}", **SECRETS}
    root = make_tree(tmp_path / "ml", {**FAST, "max_steps": "2", "eval_steps": "2", "voice_eval_prompts": "2",
                                       "report_to": "tensorboard,mlflow,wandb", "keep_writing_private": "true"},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "validation/v.jsonl": jsonl(HELD_OUT)})
    link_model_channel(root, tiny_model)
    first = run_train(root, **env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    client = mlflow.MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("llm-twin")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "twin-job-1" and run.info.status == "FINISHED"
    assert run.data.params["lora_r"] == "32" and run.data.params["method"] == "sft"
    assert run.data.params["report_to"] == "tensorboard,mlflow,wandb"
    losses = client.get_metric_history(run.info.run_id, "sft/train/loss")
    assert [m.step for m in losses] == [1, 2]
    # at step 2, and final
    assert [m.step for m in client.get_metric_history(run.info.run_id, "sft/eval/loss")] == [2, 2]
    voice = client.get_metric_history(run.info.run_id, "sft/voice/style_distance")
    assert [m.step for m in voice][0] == 0 and len(voice) == 3  # the base model's, then each evaluation's
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "training_report.json"} <= artifacts

    offline = sorted((root / "output" / "data" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    run_file = next(offline[0].glob("run-*.wandb"))
    config, history, files = read_wandb_run(run_file)
    assert config["lora_r"] == 32 and config["method"] == "sft"
    logged = {key for row in history for key in row}
    assert {"sft/step", "sft/train/loss", "sft/eval/loss", "sft/voice/style_distance", "sft/eval/perplexity"} <= logged
    assert "README.md" in files and "training_report.json" in files

    # the same training job started again (a spot restart): the same MLflow run, the same W&B run id
    second = run_train(root, **env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id] and runs[0].info.status == "FINISHED"
    offline = sorted((root / "output" / "data" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {run_file.stem.split("-", 1)[1]}

    # no credential in the job's output, its files, or what the trackers stored
    text = first.stdout + first.stderr + second.stdout + second.stderr
    for folder in (root, store):
        text += "".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
                        and not p.is_symlink() and p.stat().st_size < 50_000_000)
    for secret in SECRETS.values():
        assert secret not in text

    # keep_writing_private: the voice measures without their samples, and no held-out prompt or answer anywhere
    voice = json.loads((root / "model" / "training_report.json").read_text())["stages"]["sft"]["voice"]
    assert set(voice) == {"before", "after", "sampling", "prompts_digest"} and "voice_overlap" in voice["after"]
    stored = "".join(p.read_bytes().decode("utf-8", "replace") for folder in (root / "model", root / "output", store)
                     for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 50_000_000)
    assert [text for row in HELD_OUT for text in row.values() if text in stored] == []


def test_a_tracker_without_its_address_or_key_fails_the_job_before_any_work(tmp_path):
    root = make_tree(tmp_path, {"report_to": "mlflow"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    result = run_train(root, MLFLOW_TRACKING_URI="")
    assert result.returncode == 2
    assert (root / "output" / "failure").read_text().startswith("report_to=mlflow needs MLFLOW_TRACKING_URI")

    root = make_tree(tmp_path, {"report_to": "tensorboard,wandb"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    result = run_train(root, WANDB_API_KEY="", WANDB_MODE="")
    assert result.returncode == 2
    assert (root / "output" / "failure").read_text().startswith("report_to=wandb needs WANDB_API_KEY")


def test_a_tracking_server_that_cannot_be_reached_fails_the_job_at_the_start_without_showing_its_password(
        tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "max_steps": "2", "report_to": "mlflow"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root, MLFLOW_TRACKING_URI="http://127.0.0.1:9/", MLFLOW_TRACKING_USERNAME="twin",
                       MLFLOW_TRACKING_PASSWORD="hunter2-secret", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("report_to=mlflow could not start a run"), failure
    assert "hunter2-secret" not in failure + result.stdout + result.stderr
    assert "stage=sft step=" not in result.stdout  # nothing was trained
    assert not (root / "model").exists() or not any((root / "model").iterdir())

    root = make_tree(tmp_path / "with-password", {"report_to": "mlflow"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    result = run_train(root, MLFLOW_TRACKING_URI="http://twin:hunter2-secret@127.0.0.1:9/")
    assert result.returncode == 2
    assert "MLFLOW_TRACKING_PASSWORD" in (root / "output" / "failure").read_text()
    assert "hunter2-secret" not in result.stdout + result.stderr + (root / "output" / "failure").read_text()
