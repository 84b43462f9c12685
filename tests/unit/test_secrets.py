"""container/secrets.py: NAME_SECRET_ARN read into NAME at container start (botocore Stubber), values never printed,
and one clear line naming the variable and the permission when a reference cannot be read."""

import boto3
import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError
from botocore.stub import Stubber

from container import secrets

HF_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/hf-token-AbCdEf"
WANDB_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/tracking-Gh34Ij"
MLFLOW_ARN = "arn:aws:ssm:eu-west-1:123456789012:parameter/llm-twin/mlflow-password"
VALUES = ("hf_secret_value", "wandb-secret-key", "mlflow-secret-password")


def client(service, region="us-east-1"):
    return boto3.client(service, region_name=region, aws_access_key_id="test", aws_secret_access_key="test")


def test_references_become_the_variables_read_in_each_arns_region_and_no_value_is_printed(capsys):
    managers, parameters = client("secretsmanager"), client("ssm", "eu-west-1")
    asked = []

    def make_client(service, region):
        asked.append((service, region))
        return {"secretsmanager": managers, "ssm": parameters}[service]

    environ = {"HF_TOKEN_SECRET_ARN": HF_ARN, "WANDB_API_KEY_SECRET_ARN": WANDB_ARN,
               "MLFLOW_TRACKING_PASSWORD_SECRET_ARN": MLFLOW_ARN, "HF_TOKEN": "stale", "OTHER": "kept"}
    with Stubber(managers) as sm, Stubber(parameters) as ssm:
        sm.add_response("get_secret_value", {"SecretString": "hf_secret_value\n"},  # stored from a file
                        {"SecretId": HF_ARN})
        ssm.add_response("get_parameter", {"Parameter": {"Name": "/llm-twin/mlflow-password", "Type": "SecureString",
                                                         "Value": "mlflow-secret-password"}},
                         {"Name": MLFLOW_ARN, "WithDecryption": True})
        sm.add_response("get_secret_value",  # the console's key/value form: the key named like the variable
                        {"SecretString": '{"WANDB_API_KEY": "wandb-secret-key", "other": "x"}'},
                        {"SecretId": WANDB_ARN})
        assert secrets.resolve_into(environ, make_client) is None
        sm.assert_no_pending_responses()
        ssm.assert_no_pending_responses()
    assert sorted(asked) == [("secretsmanager", "us-east-1"), ("secretsmanager", "us-east-1"),
                             ("ssm", "eu-west-1")]
    assert environ["HF_TOKEN"] == "hf_secret_value" and environ["WANDB_API_KEY"] == "wandb-secret-key"
    assert environ["MLFLOW_TRACKING_PASSWORD"] == "mlflow-secret-password" and environ["OTHER"] == "kept"
    log = capsys.readouterr().err
    assert "llm-twin: HF_TOKEN read from HF_TOKEN_SECRET_ARN (Secrets Manager secret) (replacing the value" in log
    assert "llm-twin: MLFLOW_TRACKING_PASSWORD read from MLFLOW_TRACKING_PASSWORD_SECRET_ARN (SSM parameter)\n" in log
    assert not [value for value in VALUES if value in log]


def test_no_reference_asks_nothing():
    environ = {"HF_TOKEN": "set directly", "EMPTY_SECRET_ARN": ""}
    assert secrets.resolve_into(environ, lambda *_: pytest.fail("no client is needed")) is None
    assert environ == {"HF_TOKEN": "set directly", "EMPTY_SECRET_ARN": ""}


class Failing:
    """A client whose every call raises `error`, as botocore does with no credentials or no route."""

    def __init__(self, error):
        self.error = error

    def get_secret_value(self, **_):
        raise self.error

    get_parameter = get_secret_value


@pytest.mark.parametrize("arn, code, message", [
    (HF_ARN, "AccessDeniedException", "cannot read HF_TOKEN_SECRET_ARN's Secrets Manager secret "
     "(AccessDeniedException): the role needs secretsmanager:GetSecretValue on it (and kms:Decrypt on its KMS key"),
    (HF_ARN, "DecryptionFailure", "the role needs secretsmanager:GetSecretValue on it (and kms:Decrypt"),
    (HF_ARN, "ResourceNotFoundException", "(ResourceNotFoundException): no such one in its region: check the ARN"),
    (MLFLOW_ARN, "AccessDeniedException", "cannot read HF_TOKEN_SECRET_ARN's SSM parameter (AccessDeniedException): "
     "the role needs ssm:GetParameter on it (and kms:Decrypt on its KMS key"),
    (MLFLOW_ARN, "ParameterNotFound", "(ParameterNotFound): no such one in its region"),
])
def test_a_refused_read_names_the_variable_and_the_permission_and_changes_nothing(arn, code, message):
    service = "ssm" if ":ssm:" in arn else "secretsmanager"
    stubbed = client(service)
    environ = {"HF_TOKEN_SECRET_ARN": arn}
    with Stubber(stubbed) as stub:
        stub.add_client_error("get_parameter" if service == "ssm" else "get_secret_value", code,
                              "User: arn:aws:sts::123456789012:assumed-role/SageMakerRole/job is not authorized")
        refusal = secrets.resolve_into(environ, lambda *_: stubbed)
    assert refusal.startswith("cannot read HF_TOKEN_SECRET_ARN's ") and message in refusal and "\n" not in refusal
    assert environ == {"HF_TOKEN_SECRET_ARN": arn}


@pytest.mark.parametrize("error, message", [
    (NoCredentialsError(), "no AWS credentials here (SageMaker gives the job's or the model's role, which needs "
     "secretsmanager:GetSecretValue"),
    (EndpointConnectionError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com"),
     "EndpointConnectionError reaching secretsmanager in us-east-1 (in a VPC, it needs a NAT gateway or an interface "
     "VPC endpoint for secretsmanager)"),
])
def test_no_credentials_or_no_route_is_one_clear_line(error, message):
    refusal = secrets.resolve_into({"HF_TOKEN_SECRET_ARN": HF_ARN}, lambda *_: Failing(error))
    assert message in refusal and refusal.startswith("cannot read HF_TOKEN_SECRET_ARN's Secrets Manager secret")


@pytest.mark.parametrize("response, message", [
    ({"SecretString": '{"token": "hf_secret_value"}'},
     "HF_TOKEN_SECRET_ARN's Secrets Manager secret is a JSON object with no string under the key HF_TOKEN"),
    ({"SecretBinary": b"hf_secret_value"}, "HF_TOKEN_SECRET_ARN's Secrets Manager secret is binary"),
])
def test_a_secret_in_an_unusable_shape_is_refused_without_its_value(response, message):
    stubbed = client("secretsmanager")
    with Stubber(stubbed) as stub:
        stub.add_response("get_secret_value", response, {"SecretId": HF_ARN})
        refusal = secrets.resolve_into({"HF_TOKEN_SECRET_ARN": HF_ARN}, lambda *_: stubbed)
    assert refusal.startswith(message) and "hf_secret_value" not in refusal


@pytest.mark.parametrize("reference", [
    "hf_secret_value",  # the value itself where its ARN belongs
    "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf_secret_value:json-key::",  # ECS's suffix: not taken
    "arn:aws:ssm:us-east-1:123456789012:secret:hf_secret_value",  # the service and the resource disagree
    "arn:aws:secretsmanager:us-east-1:123456789012:parameter/hf_secret_value",
    "/hf_secret_value",  # an SSM name: launch turns it into an ARN; the container needs the region from one
])
def test_a_reference_that_is_no_arn_is_refused_without_repeating_it(reference):
    refusal = secrets.resolve_into({"HF_TOKEN_SECRET_ARN": reference}, lambda *_: pytest.fail("nothing is read"))
    assert refusal.startswith("HF_TOKEN_SECRET_ARN is not a secret's ARN: expected arn:aws:secretsmanager:")
    assert "hf_secret_value" not in refusal


def test_arns_of_every_partition_name_their_region():
    assert secrets.parse("X", "arn:aws-us-gov:ssm:us-gov-west-1:123456789012:parameter/a/b").region == "us-gov-west-1"
    assert secrets.parse("X", "arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:x-AbCdEf").service \
        == "secretsmanager"
