"""launch train: the exact CreateTrainingJob requests (botocore Stubber): spot and checkpoints, output, metric
definitions, the trackers, secrets only by reference. Shared pieces come from tests/unit/test_launch.py."""

import json

import pytest
from botocore.stub import Stubber

from container.metrics import METRIC_DEFINITIONS
from launch.__main__ import main
from tests.unit.test_launch import HF_ARN, IMAGE, ROLE, WANDB_ARN, client
from tests.unit.test_launch import no_secrets_in_the_shell  # noqa: F401  (autouse: this module's tests too)


def test_train_sends_the_exact_request_with_spot_metrics_and_hf_token_by_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")  # set in the shell too: the reference is what is sent
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"method": "sft+dpo", "num_train_epochs": 3}))
    sm = client("sagemaker")
    expected = {
        "TrainingJobName": "twin-1",
        "AlgorithmSpecification": {"TrainingImage": IMAGE, "TrainingInputMode": "File",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "RoleArn": ROLE,
        "HyperParameters": {"method": "sft+dpo", "num_train_epochs": "3", "model_id": "meta-llama/Llama-3.1-8B"},
        "InputDataConfig": [
            {"ChannelName": name, "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                                  "S3DataDistributionType": "FullyReplicated"}}}
            for name, uri in [("preference", "s3://b/pref/"), ("train", "s3://b/train/")]],
        "OutputDataConfig": {"S3OutputPath": "s3://b/out/"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 300},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200},
        "Environment": {"HF_TOKEN_SECRET_ARN": HF_ARN},
        "EnableManagedSpotTraining": True,
        "CheckpointConfig": {"S3Uri": "s3://b/ckpt/", "LocalPath": "/opt/ml/checkpoints"},
    }
    with Stubber(sm) as stub:
        stub.add_response("create_training_job",
                          {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/twin-1"}, expected)
        code = main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/train/", "--preference", "s3://b/pref/",
                     "--output", "s3://b/out/", "--hyperparameters", str(hp),
                     "--hp", "model_id=meta-llama/Llama-3.1-8B",
                     "--max-run", "3600", "--volume-size", "300", "--spot", "--max-wait", "7200", "--checkpoints", "s3://b/ckpt/",
                     "--name", "twin-1", "--secret", f"HF_TOKEN={HF_ARN}"],
                    clients={"sagemaker": sm})
        stub.assert_no_pending_responses()
    assert code == 0
    out = capsys.readouterr().out
    assert "hf_secret_value" not in out and f'"HF_TOKEN_SECRET_ARN": "{HF_ARN}"' in out


def test_spot_without_checkpoints_is_refused():
    with pytest.raises(SystemExit, match="spot training needs a checkpoint S3 URI"):
        main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/", "--spot"],
             clients={"sagemaker": client("sagemaker")})


def test_train_uncompressed_output_asks_sagemaker_for_files_not_a_tarball():
    from launch.api import training_job_request

    request = training_job_request(name="t", image=IMAGE, role=ROLE, channels={"train": "s3://b/t/"}, output="s3://b/o/",
                                   hyperparameters={}, instance_type="ml.g5.2xlarge", uncompressed_output=True)
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://b/o/", "CompressionType": "NONE"}
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/t"},
                          {**request, "HyperParameters": {}, "Environment": {}})
        assert main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/",
                     "--name", "t", "--uncompressed-output"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()


def test_train_with_tensorboard_sends_its_output_config_and_turns_the_tracking_on():
    from launch.api import training_job_request

    request = training_job_request(name="t", image=IMAGE, role=ROLE, channels={"train": "s3://b/t/"}, output="s3://b/o/",
                                   hyperparameters={}, instance_type="ml.g5.2xlarge", tensorboard_s3="s3://b/tb/")
    assert request["TensorBoardOutputConfig"] == {"S3OutputPath": "s3://b/tb/",
                                                  "LocalPath": "/opt/ml/output/tensorboard"}
    assert request["HyperParameters"] == {"report_to": "tensorboard"}
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/t"},
                          {**request, "Environment": {}})
        assert main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/",
                     "--name", "t", "--tensorboard", "s3://b/tb/"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()


def test_train_with_mlflow_and_wandb_passes_the_tracking_server_and_the_key_by_reference(monkeypatch, capsys):
    from launch.api import training_job_request, with_tracker

    arn = "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/twins"
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-key")
    monkeypatch.setenv("WANDB_API_KEY_SECRET_ARN", WANDB_ARN)  # from the shell, as the key itself used to be
    monkeypatch.setenv("WANDB_PROJECT", "twins")
    monkeypatch.setenv("HF_TOKEN", "")
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        expected = training_job_request(
            name="t", image=IMAGE, role=ROLE, channels={"train": "s3://b/t/"}, output="s3://b/o/",
            hyperparameters={"report_to": "tensorboard"}, instance_type="ml.g5.2xlarge", tensorboard_s3="s3://b/tb/",
            mlflow=arn, mlflow_experiment="voices", wandb=True,
            environment={"WANDB_API_KEY_SECRET_ARN": WANDB_ARN, "WANDB_PROJECT": "twins"})
        assert expected["HyperParameters"]["report_to"] == "tensorboard,mlflow,wandb"
        assert expected["Environment"] == {"MLFLOW_TRACKING_URI": arn, "MLFLOW_EXPERIMENT_NAME": "voices",
                                           "WANDB_API_KEY_SECRET_ARN": WANDB_ARN, "WANDB_PROJECT": "twins"}
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/t"},
                          expected)
        assert main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/",
                     "--name", "t", "--hp", "report_to=tensorboard", "--tensorboard", "s3://b/tb/", "--mlflow", arn,
                     "--mlflow-experiment", "voices", "--wandb"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    printed = capsys.readouterr().out
    assert "wandb-secret-key" not in printed and f'"WANDB_API_KEY_SECRET_ARN": "{WANDB_ARN}"' in printed
    assert with_tracker("none", "mlflow") == "mlflow" and with_tracker('["wandb"]', "mlflow") == "wandb,mlflow"
    assert with_tracker(["mlflow"], "mlflow") == "mlflow"


@pytest.mark.parametrize("argv, message", [
    (["--mlflow", "arn:aws:sagemaker:us-east-1:111122223333:endpoint/twins"],
     "not a SageMaker MLflow tracking-server ARN"),
    (["--wandb"], "--wandb needs WANDB_API_KEY"),
    (["--mlflow", "https://me:pw@mlflow.example.com/"], "export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    (["--mlflow-experiment", "voices"], "give --mlflow too"),
])
def test_train_refuses_a_tracking_server_that_is_not_one_and_wandb_without_a_key(monkeypatch, argv, message):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(SystemExit, match=message):
        main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/", *argv],
             clients={"sagemaker": client("sagemaker")})
