"""Secrets by reference: `NAME_SECRET_ARN` in the container's environment becomes `NAME`, read at start.

A job's or a model's Environment is readable by anyone allowed to describe it, so `launch` never puts a
secret's value there: it passes the ARN of a Secrets Manager secret or of an SSM parameter in
`<NAME>_SECRET_ARN` (HF_TOKEN_SECRET_ARN, WANDB_API_KEY_SECRET_ARN, ...). The entrypoint reads each value
with the container's role (boto3's default credentials, in the ARN's region) before it execs `train` or
`serve`, which then find `NAME` in their environment as if it had been set there:

    arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-AbCdEf   GetSecretValue's SecretString; when that is a
                                                               JSON object (the console's key/value form),
                                                               its key named like the variable (HF_TOKEN)
    arn:aws:ssm:REGION:ACCOUNT:parameter/NAME                  GetParameter WithDecryption (a SecureString)

A trailing newline (a value stored from a file) is dropped. Values are never printed: the log names the
variable and the kind of store only. A reference that cannot be read ends the start with one line naming
the variable and the permission the role needs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, MutableMapping

SUFFIX = "_SECRET_ARN"
FORMS = ("arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME (Secrets Manager) or "
         "arn:aws:ssm:REGION:ACCOUNT:parameter/NAME (SSM Parameter Store)")
_ARN = re.compile(r"arn:aws[a-z-]*:(?P<service>secretsmanager|ssm):(?P<region>[a-z]{2}(-[a-z]+)+-[0-9]):[0-9]{12}:"
                  r"(?P<resource>secret:[A-Za-z0-9/_+=.@-]+|parameter/[A-Za-z0-9/_.-]+)")
_RESOURCE = {"secretsmanager": "secret:", "ssm": "parameter/"}  # what each service's ARNs name
_NOT_FOUND = ("ResourceNotFoundException", "ParameterNotFound", "ParameterVersionNotFound")


class SecretError(ValueError):
    """A reference is malformed or cannot be read; the message names the variable and the fix."""


@dataclass(frozen=True)
class Reference:
    variable: str  # HF_TOKEN: what the resolved value is put in
    arn: str
    service: str  # secretsmanager or ssm
    region: str

    @property
    def name(self) -> str:
        return self.variable + SUFFIX

    @property
    def kind(self) -> str:
        return "Secrets Manager secret" if self.service == "secretsmanager" else "SSM parameter"

    @property
    def permission(self) -> str:
        action = "secretsmanager:GetSecretValue" if self.service == "secretsmanager" else "ssm:GetParameter"
        return f"{action} on it (and kms:Decrypt on its KMS key when that is a customer managed key)"


def parse(variable: str, arn: str) -> Reference:
    """The reference NAME_SECRET_ARN=arn, or SecretError (which never repeats the value: it may be the secret)."""
    match = _ARN.fullmatch(arn.strip())
    if not match or not match["resource"].startswith(_RESOURCE[match["service"]]):
        raise SecretError(f"{variable}{SUFFIX} is not a secret's ARN: expected {FORMS}")
    return Reference(variable, arn.strip(), match["service"], match["region"])


def references(environ: Mapping[str, str]) -> list[Reference]:
    """Every NAME_SECRET_ARN set (and not empty) in environ, in name order."""
    return [parse(key[:-len(SUFFIX)], value) for key, value in sorted(environ.items())
            if key.endswith(SUFFIX) and len(key) > len(SUFFIX) and value.strip()]


def read(reference: Reference, client) -> str:
    """The value reference points to, read with client (a boto3 client of its service, in its region)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        if reference.service == "ssm":
            return _trimmed(client.get_parameter(Name=reference.arn, WithDecryption=True)["Parameter"]["Value"])
        return _from_secret_string(reference, client.get_secret_value(SecretId=reference.arn))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        fix = ("no such one in its region: check the ARN" if code in _NOT_FOUND
               else f"the role needs {reference.permission}")
        raise SecretError(f"cannot read {reference.name}'s {reference.kind} ({code}): {fix}") from None
    except NoCredentialsError:
        raise SecretError(f"cannot read {reference.name}'s {reference.kind}: no AWS credentials here (SageMaker "
                          f"gives the job's or the model's role, which needs {reference.permission})") from None
    except BotoCoreError as e:  # no route: a job or endpoint in a VPC without a NAT or a VPC endpoint
        raise SecretError(f"cannot read {reference.name}'s {reference.kind}: {type(e).__name__} reaching "
                          f"{reference.service} in {reference.region} (in a VPC, it needs a NAT gateway or an "
                          f"interface VPC endpoint for {reference.service})") from None


def _from_secret_string(reference: Reference, response: dict) -> str:
    text = response.get("SecretString")
    if text is None:
        raise SecretError(f"{reference.name}'s Secrets Manager secret is binary: store the value as a string")
    try:
        document = json.loads(text)
    except ValueError:
        return _trimmed(text)
    if not isinstance(document, dict):
        return _trimmed(text)
    value = document.get(reference.variable)
    if not isinstance(value, str):
        raise SecretError(f"{reference.name}'s Secrets Manager secret is a JSON object with no string under the "
                          f"key {reference.variable}: store the plain value, or put it under that key")
    return _trimmed(value)


def _trimmed(value: str) -> str:
    return value.rstrip("\r\n")


def client(service: str, region: str):
    """A boto3 client with the default credentials (the container's role), quick to give up when unreachable."""
    import boto3  # here, not at the top: a container without references never pays for the import
    from botocore.config import Config

    config = Config(connect_timeout=10, read_timeout=20, retries={"mode": "standard", "max_attempts": 3})
    return boto3.session.Session().client(service, region_name=region, config=config)


def resolve_into(environ: MutableMapping[str, str], make_client: Callable | None = None) -> str | None:
    """Read every NAME_SECRET_ARN in environ and set NAME to its value: the entrypoint's one call, before it
    execs. Returns why a reference cannot be read (environ then unchanged), or None. make_client(service,
    region) defaults to `client`."""
    try:
        found = references(environ)
        values = {ref.variable: read(ref, (make_client or client)(ref.service, ref.region)) for ref in found}
    except SecretError as e:
        return str(e)
    for ref in found:
        replaced = " (replacing the value already set)" if environ.get(ref.variable) else ""
        print(f"llm-twin: {ref.variable} read from {ref.name} ({ref.kind}){replaced}", file=sys.stderr, flush=True)
    environ.update(values)
    return None
