"""Secrets go to SageMaker only by reference.

A job's or a model's Environment is shown to anyone allowed to describe it (and printed by `launch`), so a
secret's value never goes there: `--secret NAME=ARN` puts NAME_SECRET_ARN=ARN there instead, and the image
reads the value with its role at start (container/secrets.py). A secret's value is refused wherever it
would otherwise be sent: `--env HF_TOKEN=...` (which also shows in ps and shell history), `--env HF_TOKEN`,
and, for `train`, a secret it used to pass from this shell (HF_TOKEN, WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD,
MLFLOW_TRACKING_TOKEN) set without a reference. A secret is one of SECRET_ENV, or any name that ends like one
(_TOKEN, _PASSWORD, _SECRET, _API_KEY, _ACCESS_KEY, ...). No message repeats what might be a secret's value.
"""

from __future__ import annotations

import re
from typing import Mapping

from container.secrets import FORMS, SUFFIX, SecretError
from container.secrets import parse as parse_reference

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_PASSWORD")
SECRET_NAME = re.compile(r"(^|_)(TOKEN|PASSWORD|PASSWD|SECRET|API_KEY|SECRET_KEY|ACCESS_KEY|PRIVATE_KEY)$")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ROLE_ARN = re.compile(r"arn:(?P<partition>aws[a-z-]*):iam::(?P<account>[0-9]{12}):role/.+")


def is_secret_name(name: str) -> bool:
    return name in SECRET_ENV or bool(SECRET_NAME.search(name))


def secret_refusal(name: str, where: str) -> str:
    """Why a secret's value is refused at `where`, and how to pass it by reference instead."""
    return (f"{where}: {name} is a secret, and a job's or a model's environment is shown to anyone allowed to "
            f"describe it: store it in Secrets Manager (aws secretsmanager create-secret --name llm-twin/{name} "
            f"--secret-string file://FILE) or as an SSM SecureString parameter, and pass --secret {name}=ITS_ARN")


def check_environment(environment: Mapping[str, str]) -> None:
    """Refuse an Environment that holds a secret's value, or a NAME_SECRET_ARN that is not a secret's ARN."""
    for name, value in environment.items():
        if is_secret_name(name) and value:
            raise ValueError(secret_refusal(name, f"Environment {name}"))
        if name.endswith(SUFFIX):
            parse_reference(name[:-len(SUFFIX)], value)  # SecretError is a ValueError


def with_secrets(environment: Mapping[str, str], secrets: Mapping[str, str], *, region: str | None,
                 role: str) -> dict[str, str]:
    """environment plus NAME_SECRET_ARN for each NAME: reference in secrets. A reference is an ARN, or an SSM
    parameter's name (/path/name): the parameter of that name in the role's account and launch's region."""
    merged = dict(environment)
    for name, reference in secrets.items():
        if not ENV_NAME.fullmatch(name) or name.endswith(SUFFIX):
            raise ValueError(f"--secret {name}=...: NAME is the variable the job reads (HF_TOKEN), without {SUFFIX}")
        if name in merged or name + SUFFIX in merged:
            raise ValueError(f"--secret {name} and --env {name}: give one")
        try:
            merged[name + SUFFIX] = parse_reference(name, parameter_arn(reference, region, role)).arn
        except SecretError:
            raise ValueError(f"--secret {name}=...: expected {FORMS}, or an SSM parameter's name (/path/name); "
                             "what was given is not repeated here, in case it is the secret itself") from None
    return merged


def parameter_arn(reference: str, region: str | None, role: str) -> str:
    """An SSM parameter's name (/path/name) as its ARN in the role's account and partition; anything else as is."""
    role_arn = ROLE_ARN.fullmatch(role)
    if not reference.startswith("/") or not role_arn or not region:
        return reference
    return f"arn:{role_arn['partition']}:ssm:{region}:{role_arn['account']}:parameter{reference}"


def secret_arguments(items: list[str]) -> dict[str, str]:
    """--secret NAME=ARN (repeatable). A malformed one is refused without being repeated: it may be the secret."""
    pairs = {}
    for item in items:
        name, sep, reference = item.partition("=")
        if not (name and sep and reference):
            raise ValueError("--secret expects NAME=ARN (what was given is not repeated here, in case it is a secret)")
        pairs[name] = reference
    return pairs


def environment_arguments(items: list[str], shell: Mapping[str, str]) -> tuple[dict[str, str], set[str]]:
    """--env KEY=VALUE, or --env KEY for KEY's value in the shell: kept out of argv, ps and shell history, and
    masked when printed, for a value that is sensitive but no secret. Returns the variables and the names taken
    from the shell. A secret's name is refused either way: its value would be stored in the model."""
    environment, from_shell = {}, set()
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise ValueError("--env expects KEY=VALUE or KEY, got an empty KEY")
        if is_secret_name(key):
            shown = " (a value on the command line also shows in ps and shell history)" if sep else ""
            raise ValueError(secret_refusal(key, f"--env {key}{'=...' if sep else ''}{shown}"))
        if not sep:
            if key not in shell:
                raise ValueError(f"--env {key}: {key} is not set in this shell (or give --env {key}=VALUE)")
            value = shell[key]
            from_shell.add(key)
        environment[key] = value
    return environment, from_shell


def shell_secrets(names: list[str], given: Mapping[str, str], shell: Mapping[str, str]) -> dict[str, str]:
    """The secrets `train` takes from the shell, by reference: NAME_SECRET_ARN for each NAME --secret leaves out.
    NAME's value alone is refused: sending it would store it in the job, dropping it would fail the job later."""
    found = {}
    for name in names:
        if name in given:
            continue
        if shell.get(name + SUFFIX):
            found[name] = shell[name + SUFFIX]
        elif shell.get(name):
            raise ValueError(secret_refusal(name, f"{name} is set in this shell") +
                             f" (or export {name}{SUFFIX}=ITS_ARN); or unset {name} if the job does not need it")
    return found
