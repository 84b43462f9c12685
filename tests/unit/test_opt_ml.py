import json

import pytest

from container.opt_ml import FAILURE_REASON_LIMIT, ContractError, OptML, serving_port


def test_root_comes_from_sagemaker_base_dir(tmp_path):
    paths = OptML.from_env({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert paths.model_dir == tmp_path / "model"
    assert paths.channel("train") == tmp_path / "input" / "data" / "train"
    assert paths.failure_file == tmp_path / "output" / "failure"
    assert paths.checkpoints_dir == tmp_path / "checkpoints"
    assert OptML.from_env({}).root.as_posix() == "/opt/ml"


def test_hyperparameters_drop_the_sdks_reserved_keys(tmp_path):
    paths = OptML(tmp_path)
    paths.input_config_dir.mkdir(parents=True)
    paths.hyperparameters_file.write_text(json.dumps(
        {"lora_r": "8", "sagemaker_program": "x.py", "sagemaker_submit_directory": "s3://b/c",
         "_tuning_objective_metric": "loss", "max_steps": 3}))
    assert paths.read_hyperparameters() == {"lora_r": "8", "max_steps": "3"}


def test_missing_config_files_mean_a_single_local_host(tmp_path):
    paths = OptML(tmp_path)
    assert paths.read_hyperparameters() == {}
    resources = paths.read_resource_config()
    assert resources.hosts == ("algo-1",) and resources.current_host == "algo-1"
    (tmp_path / "input" / "data" / "train").mkdir(parents=True)
    assert paths.read_input_data_config() == {"train": {}}


def test_resource_and_input_data_config_are_read(tmp_path):
    paths = OptML(tmp_path)
    paths.input_config_dir.mkdir(parents=True)
    paths.resource_config_file.write_text(json.dumps(
        {"current_host": "algo-2", "hosts": ["algo-1", "algo-2"], "network_interface_name": "eth1"}))
    paths.input_data_config_file.write_text(json.dumps({"train": {"TrainingInputMode": "File"}}))
    resources = paths.read_resource_config()
    assert resources.current_host == "algo-2" and resources.hosts == ("algo-1", "algo-2")
    assert resources.network_interface_name == "eth1"
    assert paths.read_input_data_config() == {"train": {"TrainingInputMode": "File"}}


def test_malformed_config_files_are_contract_errors(tmp_path):
    paths = OptML(tmp_path)
    paths.input_config_dir.mkdir(parents=True)
    paths.resource_config_file.write_text('{"hosts": ["algo-1"], "current_host": "algo-9"}')
    with pytest.raises(ContractError, match="current_host 'algo-9' is not in hosts"):
        paths.read_resource_config()
    paths.hyperparameters_file.write_text("{nope")
    with pytest.raises(ContractError, match="hyperparameters.json: invalid JSON at line 1"):
        paths.read_hyperparameters()


def test_missing_channel_names_the_channel_and_those_present(tmp_path):
    paths = OptML(tmp_path)
    (tmp_path / "input" / "data" / "training").mkdir(parents=True)
    with pytest.raises(ContractError, match=r"input channel 'train' is missing.*channels present: training"):
        paths.require_channel("train")


def test_failure_file_has_a_one_line_summary_and_fits_sagemakers_limit(tmp_path):
    paths = OptML(tmp_path)
    written = paths.write_failure("bad thing\nhappened", "x" * 5000)
    text = paths.failure_file.read_text()
    assert text == written
    assert text.splitlines()[0] == "bad thing happened"
    assert len(text) == FAILURE_REASON_LIMIT


def test_serving_port():
    assert serving_port({}) == 8080
    assert serving_port({"SAGEMAKER_BIND_TO_PORT": "9001"}) == 9001
    with pytest.raises(ContractError, match="not a port number"):
        serving_port({"SAGEMAKER_BIND_TO_PORT": "http"})


def test_checkpoints_go_where_the_jobs_checkpoint_config_says(tmp_path):
    """SageMaker syncs CheckpointConfig.LocalPath with S3; it need not be /opt/ml/checkpoints."""
    paths = OptML(tmp_path)
    (tmp_path / "input" / "config").mkdir(parents=True)
    config = tmp_path / "input" / "config" / "checkpointconfig.json"
    config.write_text(json.dumps({"LocalPath": "/opt/ml/my-checkpoints", "S3Uri": "s3://b/ckpt"}))
    assert paths.checkpoints_dir == tmp_path / "my-checkpoints"  # under /opt/ml: follows SAGEMAKER_BASE_DIR
    config.write_text(json.dumps({"LocalPath": str(tmp_path / "elsewhere")}))
    assert paths.checkpoints_dir == tmp_path / "elsewhere"
