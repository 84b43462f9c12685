"""launch/ and secrets: no request it sends holds a secret's value, only references (`NAME_SECRET_ARN`), and a
value offered where it would be sent is refused without being repeated. The requests themselves are
tests/unit/test_launch.py's."""

import json

import pytest
from botocore.stub import Stubber

from launch.__main__ import main
from tests.unit.test_launch import (HF_ARN, IMAGE, MLFLOW_PASSWORD_ARN, ROLE, SHELL_SECRETS, WANDB_ARN, _component,
                                    client)
from tests.unit.test_launch import no_secrets_in_the_shell  # noqa: F401  (autouse: this module's tests too)


def recorded(*clients) -> list[tuple[str, dict]]:
    """Every request the clients are asked to send, as (operation, parameters), stubbed or not."""
    sent = []
    for one in clients:
        one.meta.events.register("before-parameter-build.*.*",
                                 lambda params, model, **_: sent.append((model.name, json.loads(json.dumps(params)))))
    return sent


def test_no_request_launch_sends_holds_a_secret_value_only_references(monkeypatch, capsys):
    """train (--wandb, --mlflow, HF_TOKEN), deploy (one model, and inference components) and batch, with every
    secret's value in the shell too: each request carries NAME_SECRET_ARN references, never a value."""
    for name, value in SHELL_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD_SECRET_ARN", MLFLOW_PASSWORD_ARN)  # from the shell
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "twin-bot")  # no secret: passed as it is
    monkeypatch.setenv("ENDPOINT_NOTE", "sensitive-but-not-secret")
    sm = client("sagemaker")
    sent = recorded(sm)
    with Stubber(sm) as stub:
        stub.add_response("create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:us-east-1:1:training-job/t"})
        for name in ("one", "batch"):
            stub.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:us-east-1:1:model/{name}"})
            if name == "one":
                stub.add_response("create_endpoint_config",
                                  {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/one"})
                stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/one"})
        stub.add_response("create_transform_job",
                          {"TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/batch"})
        assert main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/",
                     "--name", "t", "--wandb", "--mlflow", "https://mlflow.example.com",
                     "--secret", f"HF_TOKEN={HF_ARN}", "--secret", f"WANDB_API_KEY={WANDB_ARN}",
                     "--secret", "MLFLOW_TRACKING_TOKEN=/llm-twin/mlflow-token"], clients={"sagemaker": sm}) == 0
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "one",
                     "--env", "MAX_BATCH_SIZE=16", "--env", "ENDPOINT_NOTE", "--secret", f"HF_TOKEN={HF_ARN}"],
                    clients={"sagemaker": sm}) == 0
        assert main(["batch", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "batch",
                     "--input", "s3://b/in/", "--output", "s3://b/out/", "--secret", f"HF_TOKEN={HF_ARN}"],
                    clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    printed = capsys.readouterr()
    for operation, params in sent:
        for value in SHELL_SECRETS.values():
            assert value not in json.dumps(params), (operation, value)
    for value in [*SHELL_SECRETS.values(), "sensitive-but-not-secret"]:
        assert value not in printed.out + printed.err
    environments = {operation + "/" + (params.get("TrainingJobName") or params.get("ModelName")):
                    params.get("Environment") or params.get("PrimaryContainer", {}).get("Environment")
                    for operation, params in sent if operation in ("CreateTrainingJob", "CreateModel")}
    assert environments == {
        "CreateTrainingJob/t": {
            "HF_TOKEN_SECRET_ARN": HF_ARN, "WANDB_API_KEY_SECRET_ARN": WANDB_ARN,
            "MLFLOW_TRACKING_PASSWORD_SECRET_ARN": MLFLOW_PASSWORD_ARN,
            # an SSM parameter given by name: in the role's account, in launch's region
            "MLFLOW_TRACKING_TOKEN_SECRET_ARN": "arn:aws:ssm:us-east-1:123456789012:parameter/llm-twin/mlflow-token",
            "MLFLOW_TRACKING_USERNAME": "twin-bot", "MLFLOW_TRACKING_URI": "https://mlflow.example.com"},
        "CreateModel/one": {"MAX_BATCH_SIZE": "16", "ENDPOINT_NOTE": "sensitive-but-not-secret",
                            "HF_TOKEN_SECRET_ARN": HF_ARN},
        "CreateModel/batch": {"HF_TOKEN_SECRET_ARN": HF_ARN}}


def test_inference_components_carry_the_references_not_the_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    sm = client("sagemaker")
    sent = recorded(sm)
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/ic"})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/ic"})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/ic"})
        stub.add_response("describe_endpoint", {
            "EndpointName": "ic", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/ic",
            "EndpointConfigName": "ic", "EndpointStatus": "InService", "CreationTime": "2026-11-27T00:00:00Z",
            "LastModifiedTime": "2026-11-27T00:00:00Z"})
        stub.add_response("create_inference_component",
                          {"InferenceComponentArn": "arn:aws:sagemaker:us-east-1:1:inference-component/ic-base"})
        stub.add_response("describe_inference_component", _component("ic-base"))
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/base/", "--name", "ic",
                     "--inference-components", "--secret", f"HF_TOKEN={HF_ARN}"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    assert "hf_secret_value" not in json.dumps(sent)
    model = next(params for operation, params in sent if operation == "CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {"HF_TOKEN_SECRET_ARN": HF_ARN}


REFUSED = [  # (the command line after the subcommand, what the shell holds, what the refusal says)
    (["--env", "HF_TOKEN=hf_secret_value"], {}, "--secret HF_TOKEN=ITS_ARN"),
    (["--env", "HF_TOKEN=hf_secret_value"], {}, "shows in ps and shell history"),
    (["--env", "HF_TOKEN"], {"HF_TOKEN": "hf_secret_value"}, "--env HF_TOKEN: HF_TOKEN is a secret"),
    (["--env", "HUGGING_FACE_HUB_TOKEN=hf_secret_value"], {}, "aws secretsmanager create-secret"),
    (["--env", "OPENAI_API_KEY=hf_secret_value"], {}, "--secret OPENAI_API_KEY=ITS_ARN"),  # a name that says so
    (["--secret", "HF_TOKEN=hf_secret_value"], {}, "expected arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME"),
    (["--secret", "hf_secret_value"], {}, "--secret expects NAME=ARN"),
    (["--secret", "HF_TOKEN=arn:aws:secretsmanager:us-east-1:123456789012:secret:hf_secret_value:key::"], {},
     "not repeated here"),  # ECS's json-key suffix is not taken: a JSON secret's key is the variable's name
    (["--secret", "HF_TOKEN=arn:aws:ssm:us-east-1:123456789012:secret:hf_secret_value"], {}, "expected arn:aws"),
    (["--secret", f"HF_TOKEN={HF_ARN}", "--env", "HF_TOKEN_SECRET_ARN=" + HF_ARN], {}, "give one"),
]


@pytest.mark.parametrize("subcommand", ["deploy", "batch"])
@pytest.mark.parametrize("argv, shell, message", REFUSED)
def test_a_secret_value_for_a_model_is_refused_and_never_repeated(monkeypatch, capsys, subcommand, argv, shell,
                                                                  message):
    for name, value in shell.items():
        monkeypatch.setenv(name, value)
    command = {"deploy": ["deploy", "--model-data", "s3://b/m.tar.gz", "--name", "z"],
               "batch": ["batch", "--model-data", "s3://b/m.tar.gz", "--input", "s3://b/i/", "--output", "s3://b/o/"]}
    sm = client("sagemaker")
    with Stubber(sm), pytest.raises(SystemExit) as refused:  # no response stubbed: a request sent would fail here
        main([*command[subcommand], "--image", IMAGE, "--role", ROLE, *argv], clients={"sagemaker": sm})
    assert message in str(refused.value.code)
    printed = capsys.readouterr()
    assert "hf_secret_value" not in str(refused.value.code) + printed.out + printed.err


@pytest.mark.parametrize("argv, shell, message", [
    ([], {"HF_TOKEN": "hf_secret_value"}, "HF_TOKEN is set in this shell: HF_TOKEN is a secret"),
    ([], {"HF_TOKEN": "hf_secret_value"}, "or unset HF_TOKEN if the job does not need it"),
    (["--wandb"], {"WANDB_API_KEY": "hf_secret_value"}, "pass --secret WANDB_API_KEY=ITS_ARN"),
    (["--wandb"], {}, "--wandb needs WANDB_API_KEY (your W&B key), by reference"),
    (["--mlflow", "https://mlflow.example.com"], {"MLFLOW_TRACKING_PASSWORD": "hf_secret_value"},
     "export MLFLOW_TRACKING_PASSWORD_SECRET_ARN=ITS_ARN"),
    (["--secret", "HF_TOKEN=hf_secret_value"], {}, "--secret HF_TOKEN=...: expected arn:aws:secretsmanager"),
    (["--secret", "HF_TOKEN_SECRET_ARN=" + HF_ARN], {}, "without _SECRET_ARN"),
    (["--hp", "hub_token=hf_secret_value"], {}, "hyperparameter: hub_token is a secret"),  # shown like Environment
])
def test_a_secret_value_for_a_training_job_is_refused_and_never_repeated(monkeypatch, capsys, argv, shell, message):
    for name, value in shell.items():
        monkeypatch.setenv(name, value)
    sm = client("sagemaker")
    with Stubber(sm), pytest.raises(SystemExit) as refused:
        main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/", *argv],
             clients={"sagemaker": sm})
    assert message in str(refused.value.code)
    printed = capsys.readouterr()
    assert "hf_secret_value" not in str(refused.value.code) + printed.out + printed.err


def test_the_request_builders_refuse_a_secret_value_whoever_calls_them():
    from launch.api import model_request, training_job_request

    with pytest.raises(ValueError, match="Environment WANDB_API_KEY: WANDB_API_KEY is a secret"):
        training_job_request(name="t", image=IMAGE, role=ROLE, channels={}, output="s3://b/o/", hyperparameters={},
                             instance_type="ml.g5.2xlarge", environment={"WANDB_API_KEY": "k"})
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD is a secret"):
        model_request(name="m", image=IMAGE, role=ROLE, model_data="s3://b/m.tar.gz",
                      environment={"MLFLOW_TRACKING_PASSWORD": "p"})
    with pytest.raises(ValueError, match="HF_TOKEN_SECRET_ARN is not a secret's ARN"):
        model_request(name="m", image=IMAGE, role=ROLE, model_data="s3://b/m.tar.gz",
                      environment={"HF_TOKEN_SECRET_ARN": "hf_x"})


def test_env_without_a_value_takes_it_from_the_shell_and_masks_it_when_printed(monkeypatch, capsys):
    monkeypatch.setenv("ENDPOINT_NOTE", "sensitive-but-not-secret")
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/n"}, {
            "ModelName": "n", "ExecutionRoleArn": ROLE,
            "PrimaryContainer": {"Image": IMAGE, "ModelDataUrl": "s3://b/m.tar.gz",
                                 "Environment": {"ENDPOINT_NOTE": "sensitive-but-not-secret"}}})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/n"})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/n"})
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "n",
                     "--env", "ENDPOINT_NOTE"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert "sensitive-but-not-secret" not in out and '"ENDPOINT_NOTE": "****"' in out
    with pytest.raises(SystemExit, match="--env UNSET_NOTE: UNSET_NOTE is not set in this shell"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "n",
              "--env", "UNSET_NOTE"], clients={"sagemaker": sm})
