"""`python -m launch train|deploy|invoke|delete`: the image's jobs and endpoints on SageMaker.

    python -m launch train --image URI --role ARN --train s3://b/train/ --output s3://b/out/ \\
        --hyperparameters hp.json --instance-type ml.g5.2xlarge [--preference s3://...] [--spot --checkpoints s3://...]
    python -m launch deploy --image URI --role ARN --model-data s3://b/out/JOB/output/model.tar.gz --name twin
    python -m launch batch --image URI --role ARN --model-data s3://b/out/JOB/output/model.tar.gz \\
        --input s3://b/prompts/ --output s3://b/answers/ --name twin-batch
    python -m launch invoke --name twin --inputs "Write a post about LoRA" [--stream]
    python -m launch delete --name twin

HF_TOKEN, when set in this shell, is passed to the training job's environment and never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from launch.api import endpoint_requests, redacted, sse_events, training_job_request, transform_requests


def main(argv: list[str] | None = None, clients=None) -> int:
    args = parser().parse_args(argv)
    clients = clients or _boto3_clients(args.region)
    return args.run(args, clients)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--region")
    sub = p.add_subparsers(required=True)

    train = sub.add_parser("train", help="start a training job")
    train.add_argument("--image", required=True)
    train.add_argument("--role", required=True)
    for channel in ("train", "validation", "preference", "preference-validation", "model"):
        train.add_argument(f"--{channel}", help=f"S3 URI of the {channel} channel")
    train.add_argument("--output", required=True, help="S3 prefix for model.tar.gz")
    train.add_argument("--hyperparameters", type=Path, help="JSON file of hyperparameters")
    train.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    train.add_argument("--instance-type", default="ml.g5.2xlarge")
    train.add_argument("--instance-count", type=int, default=1)
    train.add_argument("--max-run", type=int, default=86400)
    train.add_argument("--spot", action="store_true")
    train.add_argument("--max-wait", type=int)
    train.add_argument("--checkpoints", help="S3 URI for /opt/ml/checkpoints (needed for spot)")
    train.add_argument("--name", default=f"llm-twin-{time.strftime('%Y%m%d-%H%M%S')}")
    train.set_defaults(run=run_train)

    deploy = sub.add_parser("deploy", help="create a real-time endpoint")
    deploy.add_argument("--image", required=True)
    deploy.add_argument("--role", required=True)
    deploy.add_argument("--model-data", required=True)
    deploy.add_argument("--name", required=True)
    deploy.add_argument("--instance-type", default="ml.g5.2xlarge")
    deploy.add_argument("--startup-timeout", type=int, default=900)
    deploy.add_argument("--inference-ami-version", metavar="AMI", default="auto",
                        help="the host image, which sets the NVIDIA driver: 'auto' (default) is "
                             "al2023-ami-sagemaker-inference-gpu-4-1 (driver 580, this image's CUDA 13.0) on GPU "
                             "instances; 'default' leaves SageMaker's choice (driver 470 on g4dn/g5/p4d: too old)")
    deploy.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a serving variable (repeatable)")
    deploy.set_defaults(run=run_deploy)

    batch = sub.add_parser("batch", help="start a batch transform job over jsonlines files")
    batch.add_argument("--image", required=True)
    batch.add_argument("--role", required=True)
    batch.add_argument("--model-data", required=True)
    batch.add_argument("--input", required=True, help="S3 prefix of .jsonl files: one TGI or chat request per line")
    batch.add_argument("--output", required=True, help="S3 prefix for the answers: FILE.out, one answer per line")
    batch.add_argument("--name", default=f"llm-twin-batch-{time.strftime('%Y%m%d-%H%M%S')}")
    batch.add_argument("--instance-type", default="ml.g5.2xlarge")
    batch.add_argument("--instance-count", type=int, default=1)
    batch.add_argument("--transform-ami-version", metavar="AMI", default="auto",
                       help="the host image, which sets the NVIDIA driver: 'auto' (default) is "
                            "al2-ami-sagemaker-batch-gpu-535 on GPU instances (SageMaker's default has 470, too old "
                            "for this image's CUDA 13.0); 'default' leaves SageMaker's choice")
    batch.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a serving variable (repeatable)")
    batch.set_defaults(run=run_batch)

    invoke = sub.add_parser("invoke", help="send one request")
    invoke.add_argument("--name", required=True)
    invoke.add_argument("--inputs", required=True)
    invoke.add_argument("--max-new-tokens", type=int, default=150)
    invoke.add_argument("--stream", action="store_true")
    invoke.set_defaults(run=run_invoke)

    delete = sub.add_parser("delete", help="delete the endpoint, its config and its model")
    delete.add_argument("--name", required=True)
    delete.set_defaults(run=run_delete)
    return p


def run_train(args, clients) -> int:
    hyperparameters = json.loads(args.hyperparameters.read_text()) if args.hyperparameters else {}
    hyperparameters.update(_pairs(args.hp))
    channels = {name: getattr(args, name.replace("-", "_")) for name in
                ("train", "validation", "preference", "preference-validation", "model")}
    channels = {name.replace("-", "_"): uri for name, uri in channels.items() if uri}
    environment = {k: os.environ[k] for k in ("HF_TOKEN",) if os.environ.get(k)}
    request = training_job_request(
        name=args.name, image=args.image, role=args.role, channels=channels, output=args.output,
        hyperparameters=hyperparameters, instance_type=args.instance_type, instance_count=args.instance_count,
        max_run=args.max_run, spot=args.spot, max_wait=args.max_wait, checkpoint_s3=args.checkpoints,
        environment=environment)
    print(json.dumps(redacted(request), indent=2))
    clients["sagemaker"].create_training_job(**request)
    print(f"started training job {args.name}")
    return 0


def run_deploy(args, clients) -> int:
    requests = endpoint_requests(name=args.name, image=args.image, role=args.role, model_data=args.model_data,
                                 instance_type=args.instance_type, environment=_pairs(args.env),
                                 startup_timeout=args.startup_timeout,
                                 ami_version=None if args.inference_ami_version == "default" else args.inference_ami_version)
    sm = clients["sagemaker"]
    sm.create_model(**requests["model"])
    sm.create_endpoint_config(**requests["config"])
    sm.create_endpoint(**requests["endpoint"])
    print(f"creating endpoint {args.name}; it answers once its status is InService")
    return 0


def run_batch(args, clients) -> int:
    requests = transform_requests(
        name=args.name, image=args.image, role=args.role, model_data=args.model_data, input_s3=args.input,
        output_s3=args.output, instance_type=args.instance_type, instance_count=args.instance_count,
        environment=_pairs(args.env),
        ami_version=None if args.transform_ami_version == "default" else args.transform_ami_version)
    sm = clients["sagemaker"]
    sm.create_model(**requests["model"])
    sm.create_transform_job(**requests["job"])
    print(f"started transform job {args.name}; answers go to {args.output}")
    return 0


def run_invoke(args, clients) -> int:
    body = {"inputs": args.inputs, "parameters": {"max_new_tokens": args.max_new_tokens, "return_full_text": False},
            "stream": args.stream}
    runtime = clients["sagemaker-runtime"]
    if not args.stream:
        response = runtime.invoke_endpoint(EndpointName=args.name, ContentType="application/json", Body=json.dumps(body))
        print(json.loads(response["Body"].read())[0]["generated_text"])
        return 0
    response = runtime.invoke_endpoint_with_response_stream(EndpointName=args.name, ContentType="application/json",
                                                            Body=json.dumps(body))
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
    sm = clients["sagemaker"]
    sm.delete_endpoint(EndpointName=args.name)
    sm.delete_endpoint_config(EndpointConfigName=args.name)
    sm.delete_model(ModelName=args.name)
    print(f"deleted endpoint, endpoint config and model {args.name}")
    return 0


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def _boto3_clients(region: str | None) -> dict:
    import boto3

    session = boto3.Session(region_name=region)
    return {"sagemaker": session.client("sagemaker"), "sagemaker-runtime": session.client("sagemaker-runtime")}


if __name__ == "__main__":
    sys.exit(main())
