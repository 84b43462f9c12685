"""`python -m launch train|deploy|batch|invoke|delete`: the image's jobs and endpoints on SageMaker.

    python -m launch train --image URI --role ARN --train s3://b/train/ --output s3://b/out/ \\
        --hyperparameters hp.json --instance-type ml.g5.2xlarge [--preference s3://...] [--spot --checkpoints s3://...]
    python -m launch deploy --image URI --role ARN --model-data s3://b/out/JOB/output/model.tar.gz --name twin \\
        [--autoscale 1:4] [--async s3://b/async-out/] [--download-timeout 1800]
    python -m launch batch --image URI --role ARN --model-data s3://b/out/JOB/output/model.tar.gz \\
        --input s3://b/prompts/ --output s3://b/answers/ --name twin-batch
    python -m launch invoke --name twin --inputs "Write a post about LoRA" [--stream]
    python -m launch delete --name twin

Secrets go only by reference, `--secret HF_TOKEN=arn:aws:secretsmanager:...`: see launch/secrets.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from launch.api import (MLFLOW_ENV, WANDB_ENV, autoscaling_requests, base_component, component_autoscaling_requests,
                        component_endpoint_requests, endpoint_requests, no_capacity_alarm, redacted, sse_events,
                        training_job_request, transform_requests)
from launch.secrets import environment_arguments, is_secret_name, secret_arguments, shell_secrets, with_secrets

POLL_SECONDS = 15  # how often deploy and delete look at a component's status
COMPONENT_WAIT_SECONDS = 3600  # how long deploy and delete wait for a component to be created or deleted


def main(argv: list[str] | None = None, clients=None) -> int:
    """Exits with AWS's own words (no traceback) when a call is refused or no credentials or region are set."""
    from botocore.exceptions import BotoCoreError, ClientError

    args = parser().parse_args(argv)
    try:
        clients = clients or _boto3_clients(args.region)
        return args.run(args, clients)
    except (BotoCoreError, ClientError) as e:
        cleanup = (f"; `python -m launch delete --name {args.name}` removes what deploy created"
                   if args.run is run_deploy else "")
        raise SystemExit(f"launch: AWS refused: {e}{cleanup}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--region")
    sub = p.add_subparsers(required=True)

    train = sub.add_parser("train", help="start a training job")
    train.add_argument("--image", required=True)
    train.add_argument("--role", required=True)
    for channel in ("train", "validation", "preference", "preference-validation", "documents", "teacher", "model"):
        train.add_argument(f"--{channel}", help=f"S3 URI of the {channel.replace('-', '_')} channel")
    train.add_argument("--output", required=True, help="S3 prefix for model.tar.gz")
    train.add_argument("--hyperparameters", type=Path, help="JSON file of hyperparameters")
    train.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    train.add_argument("--instance-type", default="ml.g5.2xlarge")
    train.add_argument("--instance-count", type=int, default=1)
    train.add_argument("--volume-size", type=int, default=100, metavar="GB",
                       help="each instance's storage volume (VolumeSizeInGB): the model, its checkpoints and the "
                            "merged export must fit")
    train.add_argument("--max-run", type=int, default=86400)
    train.add_argument("--spot", action="store_true")
    train.add_argument("--max-wait", type=int)
    train.add_argument("--checkpoints", help="S3 URI for /opt/ml/checkpoints (needed for spot)")
    train.add_argument("--name", default=f"llm-twin-{time.strftime('%Y%m%d-%H%M%S')}")
    train.add_argument("--tensorboard", metavar="S3URI",
                       help="TensorBoardOutputConfig: the job's event files (report_to=tensorboard) go to S3URI")
    train.add_argument("--mlflow", metavar="ARN",
                       help="report_to=mlflow: a SageMaker managed MLflow tracking-server ARN "
                            "(or a tracking server's URI); the job's role needs sagemaker-mlflow:* on it")
    train.add_argument("--mlflow-experiment", metavar="NAME", help="the MLflow experiment (default llm-twin)")
    train.add_argument("--wandb", action="store_true",
                       help="report_to=wandb: passes WANDB_PROJECT, WANDB_ENTITY, WANDB_BASE_URL from your environment "
                            "to the job, and WANDB_API_KEY by reference (--secret WANDB_API_KEY=ARN)")
    _secret_argument(train)
    train.add_argument("--uncompressed-output", action="store_true",
                       help="upload the model as files (OUTPUT/NAME/output/model/), not model.tar.gz: for large models")
    train.set_defaults(run=run_train)

    deploy = sub.add_parser("deploy", help="create a real-time endpoint")
    _hosting_arguments(deploy, "--inference-ami-version", "al2023-ami-sagemaker-inference-gpu-4-1 (driver 580, this "
                       "image's CUDA 13.0) on GPU instances; 'default' leaves SageMaker's choice (driver 470 on "
                       "g4dn/g5/p4d: too old)")
    deploy.add_argument("--model-data", help="a model.tar.gz, or an S3 prefix of the model's files (uncompressed, "
                        "e.g. a job's output/model/ from --uncompressed-output); omit with --env HF_MODEL_ID=...")
    deploy.add_argument("--download-timeout", type=int, metavar="SECONDS",
                        help="ModelDataDownloadTimeoutInSeconds (60-3600): raise it for models over about 40 GB")
    deploy.add_argument("--async", dest="async_output", metavar="S3OUT",
                        help="an asynchronous endpoint writing its answers under S3OUT (a request may run as long as "
                             "InvokeEndpointAsync's InvocationTimeoutSeconds: 900 s by default, up to 3600)")
    deploy.add_argument("--async-concurrency", type=int, default=4,
                        help="MaxConcurrentInvocationsPerInstance for --async (default 4)")
    deploy.add_argument("--autoscale", metavar="MIN:MAX",
                        help="target-tracking autoscaling on concurrent requests per model copy: of the instance "
                             "count, or with inference components of the base component's copy count")
    deploy.add_argument("--autoscale-target", type=float, default=16.0,
                        help="concurrent requests per model copy that --autoscale keeps to (default 16)")
    deploy.add_argument("--inference-components", action="store_true",
                        help="host the model as an inference component (implied by --adapter): "
                             "allows --autoscale 0:MAX")
    deploy.add_argument("--adapter", action="append", default=[], metavar="NAME=S3URI",
                        help="a LoRA adapter's model.tar.gz as its own inference component NAME-ADAPTER on the base "
                             "model's (repeatable)")
    deploy.add_argument("--accelerators", type=int,
                        help="GPUs per copy of the base component (default 1 on GPU instances)")
    deploy.add_argument("--memory-mb", type=int, default=5120, help="memory reserved per copy (default 5120)")
    deploy.add_argument("--name", required=True)
    deploy.add_argument("--startup-timeout", type=int, default=900)
    deploy.set_defaults(run=run_deploy)

    batch = sub.add_parser("batch", help="start a batch transform job over jsonlines files")
    _hosting_arguments(batch, "--transform-ami-version", "al2-ami-sagemaker-batch-gpu-535 on GPU instances "
                       "(SageMaker's default has 470, too old for this image's CUDA 13.0); 'default' leaves "
                       "SageMaker's choice")
    batch.add_argument("--model-data", required=True)
    batch.add_argument("--input", required=True, help="S3 prefix of .jsonl files: one TGI or chat request per line")
    batch.add_argument("--output", required=True, help="S3 prefix for the answers: FILE.out, one answer per line")
    batch.add_argument("--name", default=f"llm-twin-batch-{time.strftime('%Y%m%d-%H%M%S')}")
    batch.add_argument("--instance-count", type=int, default=1)
    batch.set_defaults(run=run_batch)

    invoke = sub.add_parser("invoke", help="send one request")
    invoke.add_argument("--name", required=True)
    invoke.add_argument("--component", help="the inference component to ask (NAME-base, or NAME-ADAPTER)")
    invoke.add_argument("--inputs", required=True)
    invoke.add_argument("--max-new-tokens", type=int, default=150)
    invoke.add_argument("--stream", action="store_true")
    invoke.set_defaults(run=run_invoke)

    delete = sub.add_parser("delete", help="delete the endpoint, its config and its model")
    delete.add_argument("--name", required=True)
    delete.set_defaults(run=run_delete)
    return p


def _hosting_arguments(p: argparse.ArgumentParser, ami_flag: str, auto_ami: str) -> None:
    """What an endpoint and a transform job both take: the image, its role, the instance, the host image
    (which sets the NVIDIA driver), and serving variables."""
    p.add_argument("--image", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--instance-type", default="ml.g5.2xlarge")
    p.add_argument(ami_flag, dest="ami_version", metavar="AMI", default="auto",
                   help=f"the host image, which sets the NVIDIA driver: 'auto' (default) is {auto_ami}")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE|KEY",
                   help="a serving variable (repeatable); KEY alone takes KEY's value from your environment (out of "
                        "argv, masked when printed). A secret's name is refused: use --secret")
    _secret_argument(p)


def _secret_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secret", action="append", default=[], metavar="NAME=ARN",
                   help="a secret by reference (repeatable): the ARN of a Secrets Manager secret or an SSM parameter "
                        "(or its /path/name); the container reads it into NAME at start with its role")


def _ami(args) -> str | None:
    return None if args.ami_version == "default" else args.ami_version


def run_train(args, clients) -> int:
    hyperparameters = {**_hyperparameter_file(args.hyperparameters), **_pairs(args.hp, "--hp")}
    channels = {name: getattr(args, name.replace("-", "_")) for name in
                ("train", "validation", "preference", "preference-validation", "documents", "teacher", "model")}
    channels = {name.replace("-", "_"): uri for name, uri in channels.items() if uri}
    passed = ("HF_TOKEN",) + (WANDB_ENV if args.wandb else ()) + (MLFLOW_ENV if args.mlflow else ())
    environment = {k: os.environ[k] for k in passed if os.environ.get(k) and not is_secret_name(k)}
    try:
        given = secret_arguments(args.secret)
        secrets = {**shell_secrets([k for k in passed if is_secret_name(k)], given, os.environ), **given}
        environment = with_secrets(environment, secrets, region=_region(clients), role=args.role)
        request = training_job_request(
            name=args.name, image=args.image, role=args.role, channels=channels, output=args.output,
            hyperparameters=hyperparameters, instance_type=args.instance_type, instance_count=args.instance_count,
            volume_gb=args.volume_size, max_run=args.max_run, spot=args.spot, max_wait=args.max_wait,
            checkpoint_s3=args.checkpoints,
            environment=environment, uncompressed_output=args.uncompressed_output, tensorboard_s3=args.tensorboard,
            mlflow=args.mlflow, mlflow_experiment=args.mlflow_experiment, wandb=args.wandb)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(json.dumps(redacted(request), indent=2))
    clients["sagemaker"].create_training_job(**request)
    print(f"started training job {args.name}")
    return 0


def _hyperparameter_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"--hyperparameters {path}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"--hyperparameters {path}: not JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise SystemExit(f"--hyperparameters {path}: expected a JSON object of name: value, got "
                         f"{type(loaded).__name__}")
    return loaded


def _serving_environment(args, clients) -> tuple[dict[str, str], set[str]]:
    """The model's Environment from --env and --secret, and the names whose values came from this shell."""
    try:
        environment, from_shell = environment_arguments(args.env, os.environ)
        environment = with_secrets(environment, secret_arguments(args.secret), region=_region(clients),
                                   role=args.role)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return environment, from_shell


def _region(clients) -> str | None:
    """The region launch sends to: an SSM parameter given by name is taken there."""
    return clients["sagemaker"].meta.region_name


def run_deploy(args, clients) -> int:
    if args.inference_components or args.adapter:
        return _deploy_components(args, clients)
    environment, from_shell = _serving_environment(args, clients)
    try:
        requests = endpoint_requests(name=args.name, image=args.image, role=args.role, model_data=args.model_data,
                                     instance_type=args.instance_type, environment=environment,
                                     startup_timeout=args.startup_timeout, ami_version=_ami(args),
                                     download_timeout=args.download_timeout, async_output=args.async_output,
                                     async_concurrency=args.async_concurrency)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    scaling = None
    if args.autoscale:
        low, high = _autoscale_range(args.autoscale)
        if args.async_output:  # its load shows as a queue in S3, not as concurrent requests per copy
            raise SystemExit("--autoscale scales on concurrent requests per copy, which an async endpoint (capped at "
                             "--async-concurrency) never reaches: scale an async endpoint on its backlog "
                             "(ApproximateBacklogSizePerInstance) instead")
        try:
            scaling = autoscaling_requests(name=args.name, min_instances=low, max_instances=high,
                                           target=args.autoscale_target)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    sm = _create_endpoint(clients, requests, from_shell)
    if scaling is None:
        print(f"creating endpoint {args.name}; it answers once its status is InService")
        return 0
    print(f"creating endpoint {args.name}; waiting for InService to register its autoscaling")
    sm.get_waiter("endpoint_in_service").wait(EndpointName=args.name)
    autoscaling = clients["application-autoscaling"]
    autoscaling.register_scalable_target(**scaling["target"])
    autoscaling.put_scaling_policy(**scaling["policy"])
    print(f"endpoint {args.name} is in service, scaling {args.autoscale} on concurrent requests per copy")
    return 0


def _deploy_components(args, clients) -> int:
    """An inference-component endpoint: the endpoint, then the base component once the endpoint is in
    service, then each adapter once the base is, then the base's autoscaling (from zero when MIN is 0)."""
    if args.async_output:
        raise SystemExit("--async endpoints host one model, not inference components: drop --async or "
                         "--inference-components/--adapter")
    low, high = _autoscale_range(args.autoscale) if args.autoscale else (1, 1)
    environment, from_shell = _serving_environment(args, clients)
    try:
        requests = component_endpoint_requests(
            name=args.name, image=args.image, role=args.role, model_data=args.model_data,
            instance_type=args.instance_type, environment=environment, startup_timeout=args.startup_timeout,
            ami_version=_ami(args), download_timeout=args.download_timeout, min_instances=low, max_instances=high,
            accelerators=args.accelerators, memory_mb=args.memory_mb, adapters=_pairs(args.adapter, "--adapter"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sm = _create_endpoint(clients, requests, from_shell)
    print(f"creating endpoint {args.name}; its components follow once it is InService")
    sm.get_waiter("endpoint_in_service").wait(EndpointName=args.name)
    base = requests["base"]["InferenceComponentName"]
    sm.create_inference_component(**requests["base"])
    _wait_for_component(sm, base)
    for adapter in requests["adapters"]:
        sm.create_inference_component(**adapter)
        print(f"adapter component {adapter['InferenceComponentName']} created")
    if args.autoscale:
        adapters = tuple(a["InferenceComponentName"] for a in requests["adapters"])
        scaling = component_autoscaling_requests(component=base, min_copies=low, max_copies=high,
                                                 target=args.autoscale_target, invoked=adapters)
        autoscaling = clients["application-autoscaling"]
        autoscaling.register_scalable_target(**scaling["target"])
        autoscaling.put_scaling_policy(**scaling["policy"])
        if "from_zero" in scaling:
            arn = autoscaling.put_scaling_policy(**scaling["from_zero"])["PolicyARN"]
            for alarm in scaling["alarms"]:
                clients["cloudwatch"].put_metric_alarm(**alarm, AlarmActions=[arn])
    components = ", ".join([base] + [a["InferenceComponentName"] for a in requests["adapters"]])
    print(f"endpoint {args.name} serves components {components}: invoke with --component NAME")
    return 0


def _create_endpoint(clients, requests: dict, from_shell: set[str]):
    """CreateModel (printed, secrets and values from the shell masked), CreateEndpointConfig, CreateEndpoint;
    the SageMaker client."""
    print(json.dumps(redacted(requests["model"], from_shell), indent=2))
    sm = clients["sagemaker"]
    sm.create_model(**requests["model"])
    sm.create_endpoint_config(**requests["config"])
    sm.create_endpoint(**requests["endpoint"])
    return sm


def _wait_for_component(sm, name: str) -> None:
    deadline = time.monotonic() + COMPONENT_WAIT_SECONDS
    while time.monotonic() < deadline:
        described = sm.describe_inference_component(InferenceComponentName=name)
        status = described["InferenceComponentStatus"]
        if status == "InService":
            return
        if status == "Failed":
            raise SystemExit(f"inference component {name} failed: {described.get('FailureReason', 'no reason given')}")
        time.sleep(POLL_SECONDS)
    raise SystemExit(f"inference component {name} is not in service after {COMPONENT_WAIT_SECONDS} s")


def _autoscale_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    if not (low.isdigit() and high.isdigit()):
        raise SystemExit(f"--autoscale takes MIN:MAX counts, e.g. 1:4; got {text!r}")
    return int(low), int(high)


def run_batch(args, clients) -> int:
    environment, _ = _serving_environment(args, clients)
    try:
        requests = transform_requests(
            name=args.name, image=args.image, role=args.role, model_data=args.model_data, input_s3=args.input,
            output_s3=args.output, instance_type=args.instance_type, instance_count=args.instance_count,
            environment=environment, ami_version=_ami(args))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sm = clients["sagemaker"]
    sm.create_model(**requests["model"])
    sm.create_transform_job(**requests["job"])
    print(f"started transform job {args.name}; answers go to {args.output}")
    return 0


def run_invoke(args, clients) -> int:
    body = {"inputs": args.inputs, "parameters": {"max_new_tokens": args.max_new_tokens, "return_full_text": False},
            "stream": args.stream}
    runtime = clients["sagemaker-runtime"]
    target = {"EndpointName": args.name, "ContentType": "application/json", "Body": json.dumps(body)}
    if args.component:
        target["InferenceComponentName"] = args.component
    if not args.stream:
        response = runtime.invoke_endpoint(**target)
        print(json.loads(response["Body"].read())[0]["generated_text"])
        return 0
    response = runtime.invoke_endpoint_with_response_stream(**target)
    for event in sse_events(response["Body"]):
        if "error" in event:
            print(f"\nerror: {event['error']}", file=sys.stderr)
            return 1
        token = event.get("token") or {}
        if not token.get("special"):
            print(token.get("text", ""), end="", flush=True)
    print()
    return 0


def run_delete(args, clients) -> int:
    """The endpoint's inference components first (adapters before their base), waiting until they are gone,
    and their autoscaling (alarms, scalable target); then the endpoint, its config and its model."""
    sm = clients["sagemaker"]
    base = base_component(args.name)
    components = _components(sm, args.name)
    for stage in ([c for c in components if c["InferenceComponentName"] != base],
                  [c for c in components if c["InferenceComponentName"] == base]):
        names = {c["InferenceComponentName"] for c in stage}
        for name in sorted(names):
            sm.delete_inference_component(InferenceComponentName=name)
        deadline = time.monotonic() + COMPONENT_WAIT_SECONDS
        while names:
            left = [c for c in _components(sm, args.name) if c["InferenceComponentName"] in names]
            failed = [c["InferenceComponentName"] for c in left if c.get("InferenceComponentStatus") == "Failed"]
            if failed:
                raise SystemExit(f"inference component(s) {', '.join(failed)} failed to delete: "
                                 "see the SageMaker console")
            if not left:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"inference components still deleting after {COMPONENT_WAIT_SECONDS} s: "
                                 f"{', '.join(c['InferenceComponentName'] for c in left)}")
            time.sleep(POLL_SECONDS)
    if components:
        _delete_component_autoscaling(clients, base, [c["InferenceComponentName"] for c in components])
    deleted = [kind for kind, delete, key in ((("endpoint", sm.delete_endpoint, "EndpointName"),
                                               ("endpoint config", sm.delete_endpoint_config, "EndpointConfigName"),
                                               ("model", sm.delete_model, "ModelName")))
               if _delete_if_there(delete, **{key: args.name})]
    print(f"deleted {', '.join(deleted) or 'nothing (none was there)'} {args.name}")
    return 0


def _delete_if_there(delete, **name) -> bool:
    """One deletion; False when there was nothing of that name (a deploy that failed half-way leaves some)."""
    from botocore.exceptions import ClientError

    try:
        delete(**name)
    except ClientError as e:
        if "Could not find" in str(e) or e.response.get("Error", {}).get("Code") == "ResourceNotFound":
            return False
        raise
    return True


def _delete_component_autoscaling(clients, base: str, components: list[str]) -> None:
    """What `deploy --autoscale` made for the components, where it exists (its policies go with the target)."""
    alarms = [no_capacity_alarm(name) for name in components]
    if clients["cloudwatch"].describe_alarms(AlarmNames=alarms)["MetricAlarms"]:
        clients["cloudwatch"].delete_alarms(AlarmNames=alarms)
    target = {"ServiceNamespace": "sagemaker", "ScalableDimension": "sagemaker:inference-component:DesiredCopyCount"}
    resource = f"inference-component/{base}"
    autoscaling = clients["application-autoscaling"]
    if autoscaling.describe_scalable_targets(**target, ResourceIds=[resource])["ScalableTargets"]:
        autoscaling.deregister_scalable_target(**target, ResourceId=resource)


def _components(sm, endpoint: str) -> list[dict]:
    """Every inference component on the endpoint (ListInferenceComponents pages at 10 by default)."""
    components, token = [], None
    while True:
        page = sm.list_inference_components(EndpointNameEquals=endpoint, MaxResults=100,
                                            **({"NextToken": token} if token else {}))
        components += page["InferenceComponents"]
        token = page.get("NextToken")
        if not token:
            return components


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _boto3_clients(region: str | None) -> dict:
    import boto3

    session = boto3.Session(region_name=region)
    return {name: session.client(name)
            for name in ("sagemaker", "sagemaker-runtime", "application-autoscaling", "cloudwatch")}


if __name__ == "__main__":
    sys.exit(main())
