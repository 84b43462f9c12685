"""The SageMaker API requests, built as plain dicts (so tests can check them exactly) and sent with boto3.

boto3's API is used rather than the SDK's ModelTrainer/ModelBuilder: every field this image needs
(spot with checkpoints, metric definitions, the startup health-check timeout, response streaming) maps
one to one, and the requests stay visible.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Iterator

from container.config import URI_WITH_PASSWORD, coerce
from container.metrics import METRIC_DEFINITIONS
from launch.secrets import ROLE_ARN, SUFFIX, check_environment, is_secret_name, secret_refusal

WANDB_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL")  # what --wandb passes on
MLFLOW_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")  # and --mlflow
MLFLOW_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:[0-9]{12}:mlflow-(tracking-server|app)/.+")

# The image is CUDA 13.0 (driver 580+, or 535+ with forward compatibility). SageMaker's default host
# image runs driver 470 on g4dn/g5/p4d endpoints (too old for either) and 535/550 on g6/p5/p5e: the host
# image with driver 580 runs it natively on every GPU instance family, so GPU endpoints get it by default.
GPU_INFERENCE_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"
GPU_FAMILIES = ("ml.g", "ml.p")


# Batch transform hosts run driver 470 by default; no batch host image has 580 yet, so GPU jobs take
# the 535 one, where the entrypoint turns on CUDA forward compatibility.
GPU_TRANSFORM_AMI = "al2-ami-sagemaker-batch-gpu-535"
# A transform job waits at most 3600 s for one mini-batch (InvocationsTimeoutInSeconds' maximum); the
# server gives up a minute earlier, so a mini-batch that cannot finish fails with the server's answer.
TRANSFORM_INVOCATION_TIMEOUT = 3600
TRANSFORM_SERVER_TIMEOUT = 3540
ASYNC_SERVER_TIMEOUT = 3540  # an async invocation may run up to 3600 s; the server answers first
VARIANT = "AllTraffic"


def check_s3(flag: str, uri: str | None) -> None:
    """SageMaker takes S3 URIs only: a local path or a typo fails here, not after an instance has started."""
    if uri is not None and not re.fullmatch(r"s3://[^/\s]+(/.*)?", uri):
        raise ValueError(f"{flag} {uri!r}: expected an S3 URI, s3://BUCKET/PREFIX (upload local files first: "
                         "aws s3 cp --recursive)")


def check_role(role: str) -> None:
    if not ROLE_ARN.fullmatch(role):
        raise ValueError(f"--role {role!r}: expected an IAM role's ARN, arn:aws:iam::ACCOUNT:role/NAME")


def check_hosts(role: str, instance_type: str, instance_count: int = 1) -> None:
    check_role(role)
    if not re.fullmatch(r"ml\.[a-z0-9-]+\.[a-z0-9]+", instance_type):
        raise ValueError(f"--instance-type {instance_type!r}: expected a SageMaker instance type, e.g. ml.g5.2xlarge")
    if instance_count < 1:
        raise ValueError(f"--instance-count {instance_count}: expected 1 or more")


def default_inference_ami(instance_type: str) -> str | None:
    """The InferenceAmiVersion this image needs on instance_type: the driver-580 host image on GPUs, else none."""
    return GPU_INFERENCE_AMI if instance_type.startswith(GPU_FAMILIES) else None


def default_transform_ami(instance_type: str) -> str | None:
    """The TransformAmiVersion this image needs on instance_type: the driver-535 host image on GPUs."""
    return GPU_TRANSFORM_AMI if instance_type.startswith(GPU_FAMILIES) else None


def training_job_request(*, name: str, image: str, role: str, channels: dict[str, str], output: str,
                         hyperparameters: dict, instance_type: str, instance_count: int = 1, volume_gb: int = 100,
                         max_run: int = 86400, spot: bool = False, max_wait: int | None = None,
                         checkpoint_s3: str | None = None, environment: dict[str, str] | None = None,
                         uncompressed_output: bool = False, tensorboard_s3: str | None = None,
                         mlflow: str | None = None, mlflow_experiment: str | None = None, wandb: bool = False) -> dict:
    """CreateTrainingJob. uncompressed_output: SageMaker uploads /opt/ml/model as files under
    OUTPUT/JOB/output/model/ instead of packing model.tar.gz (for large models). Experiment tracking (each
    adds itself to report_to): tensorboard_s3: the job's TensorBoard event files go there, for SageMaker's
    TensorBoard app; mlflow: a SageMaker managed MLflow tracking-server ARN (or a tracking server's URI),
    in mlflow_experiment; wandb: W&B, with the WANDB_* variables `environment` holds."""
    if spot and not checkpoint_s3:
        raise ValueError("spot training needs a checkpoint S3 URI, or an interruption loses the work")
    if max_wait is not None and not spot:
        raise ValueError("--max-wait is how long a spot job may wait for capacity: give --spot too, or drop it")
    if spot and max_wait is not None and max_wait < max_run:
        raise ValueError(f"--max-wait {max_wait} is below --max-run {max_run}: SageMaker's MaxWaitTimeInSeconds "
                         "counts the run and the waiting for spot capacity, so it must be at least --max-run")
    check_hosts(role, instance_type, instance_count)
    if not 1 <= volume_gb <= 16384:  # CreateTrainingJob's range
        raise ValueError(f"--volume-size {volume_gb}: expected 1 to 16384 (GB)")
    for flag, uri in (*((f"--{channel.replace('_', '-')}", uri) for channel, uri in channels.items()),
                      ("--output", output), ("--checkpoints", checkpoint_s3), ("--tensorboard", tensorboard_s3)):
        check_s3(flag, uri)
    for key in hyperparameters:  # shown to anyone who may describe the job, and printed by launch
        if is_secret_name(key.upper()):
            raise ValueError(secret_refusal(key, "hyperparameter"))
    hyperparameters, environment = dict(hyperparameters), dict(environment or {})
    if mlflow:
        if mlflow.startswith("arn:") and not MLFLOW_ARN.fullmatch(mlflow):
            raise ValueError(f"--mlflow {mlflow}: not a SageMaker MLflow tracking-server ARN "
                             "(arn:aws:sagemaker:REGION:ACCOUNT:mlflow-tracking-server/NAME)")
        if URI_WITH_PASSWORD.search(mlflow):
            raise ValueError("--mlflow: the URI holds a user and password, which would be printed and stored with "
                             "the job: export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
        environment["MLFLOW_TRACKING_URI"] = mlflow
        if mlflow_experiment:
            environment["MLFLOW_EXPERIMENT_NAME"] = mlflow_experiment
    elif mlflow_experiment:
        raise ValueError("--mlflow-experiment names an experiment on the --mlflow tracking server: give --mlflow too")
    if wandb and not environment.get("WANDB_API_KEY" + SUFFIX):
        raise ValueError("--wandb needs WANDB_API_KEY (your W&B key), by reference: store it in Secrets Manager and "
                         "pass --secret WANDB_API_KEY=ITS_ARN (or export WANDB_API_KEY_SECRET_ARN)")
    check_environment(environment)
    for tracker, wanted in (("tensorboard", tensorboard_s3), ("mlflow", mlflow), ("wandb", wandb)):
        if wanted:
            hyperparameters["report_to"] = with_tracker(hyperparameters.get("report_to", "none"), tracker)
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "RoleArn": role,
        # SageMaker takes strings; JSON-encoding them is one of the encodings `train` decodes.
        "HyperParameters": {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()},
        "InputDataConfig": [
            {"ChannelName": channel, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}
            for channel, uri in sorted(channels.items())],
        "OutputDataConfig": {"S3OutputPath": output, **({"CompressionType": "NONE"} if uncompressed_output else {})},
        "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": instance_count, "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_run},
        "Environment": environment,
    }
    if spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait or max_run
    if checkpoint_s3:
        request["CheckpointConfig"] = {"S3Uri": checkpoint_s3, "LocalPath": "/opt/ml/checkpoints"}
    if tensorboard_s3:  # SageMaker uploads the job's event files there while it runs
        request["TensorBoardOutputConfig"] = {"S3OutputPath": tensorboard_s3, "LocalPath": "/opt/ml/output/tensorboard"}
    return request


def with_tracker(report_to, tracker: str) -> str:
    """report_to (a list, or a string as `train` reads it: "none", "tensorboard,mlflow", '["mlflow"]') with
    tracker added."""
    raw = report_to if isinstance(report_to, str) else json.dumps(report_to)
    names = [name for name in coerce("report_to", raw, tuple[str, ...]) if name != "none"]
    return ",".join(names + ([tracker] if tracker not in names else []))


def endpoint_requests(*, name: str, image: str, role: str, model_data: str | None, instance_type: str,
                      environment: dict[str, str] | None = None, startup_timeout: int = 900,
                      ami_version: str | None = "auto", download_timeout: int | None = None,
                      async_output: str | None = None, async_concurrency: int = 4) -> dict[str, dict]:
    """CreateModel, CreateEndpointConfig and CreateEndpoint for one endpoint: real-time, or asynchronous
    with async_output (answers written to S3; a request may then run up to an hour). ami_version "auto" is
    default_inference_ami(instance_type); None or "" leaves SageMaker's default host image."""
    check_hosts(role, instance_type)
    check_s3("--async", async_output)
    if ami_version == "auto":
        ami_version = default_inference_ami(instance_type)
    environment = dict(environment or {})
    if async_output:  # async invocations may run 3600 s; the server's timeout must not cut them at 120
        environment.setdefault("SAGEMAKER_MODEL_SERVER_TIMEOUT", str(ASYNC_SERVER_TIMEOUT))
    variant = {"VariantName": VARIANT, "ModelName": name, "InstanceType": instance_type, "InitialInstanceCount": 1,
               "ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout}
    if download_timeout:
        variant["ModelDataDownloadTimeoutInSeconds"] = download_timeout
    if ami_version:
        variant["InferenceAmiVersion"] = ami_version
    config = {"EndpointConfigName": name, "ProductionVariants": [variant]}
    if async_output:
        config["AsyncInferenceConfig"] = {"OutputConfig": {"S3OutputPath": async_output},
                                          "ClientConfig": {"MaxConcurrentInvocationsPerInstance": async_concurrency}}
    return {
        "model": model_request(name=name, image=image, role=role, model_data=model_data, environment=environment),
        "config": config,
        "endpoint": {"EndpointName": name, "EndpointConfigName": name},
    }


def autoscaling_requests(*, name: str, min_instances: int, max_instances: int, target: float) -> dict[str, dict]:
    """Application Auto Scaling's RegisterScalableTarget and PutScalingPolicy: target tracking on the
    concurrent requests per model copy (SageMaker's high-resolution metric, reported every 10 s)."""
    if not 1 <= min_instances <= max_instances:
        raise ValueError(f"--autoscale {min_instances}:{max_instances}: need 1 <= MIN <= MAX (an endpoint variant "
                         "keeps at least one instance; scaling to zero needs inference components: add "
                         "--inference-components)")
    scalable = {"ServiceNamespace": "sagemaker", "ResourceId": f"endpoint/{name}/variant/{VARIANT}",
                "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
    return _target_tracking(scalable, name, min_instances, max_instances, target,
                            "SageMakerVariantConcurrentRequestsPerModelHighResolution")


def _target_tracking(scalable: dict, name: str, low: int, high: int, target: float, metric: str) -> dict:
    """RegisterScalableTarget and a target-tracking PutScalingPolicy on one of SageMaker's predefined metrics."""
    return {
        "target": {**scalable, "MinCapacity": low, "MaxCapacity": high},
        "policy": {**scalable, "PolicyName": f"{name}-concurrent-requests", "PolicyType": "TargetTrackingScaling",
                   "TargetTrackingScalingPolicyConfiguration": {
                       "TargetValue": float(target), "PredefinedMetricSpecification": {"PredefinedMetricType": metric},
                       "ScaleOutCooldown": 60, "ScaleInCooldown": 300}},
    }


def component_endpoint_requests(*, name: str, image: str, role: str, model_data: str | None, instance_type: str,
                                environment: dict[str, str] | None = None, startup_timeout: int = 900,
                                ami_version: str | None = "auto", download_timeout: int | None = None,
                                min_instances: int = 1, max_instances: int = 1, accelerators: int | None = None,
                                memory_mb: int = 5120, adapters: dict[str, str] | None = None) -> dict:
    """An endpoint that hosts inference components: the base model as one component (BASE_COMPONENT), each
    adapter (a LoRA adapter's model.tar.gz) as a component on top of it. SageMaker's managed instance scaling
    keeps MIN to MAX instances; MIN 0 lets the endpoint scale to zero. Returns CreateModel,
    CreateEndpointConfig, CreateEndpoint, the base's CreateInferenceComponent and one per adapter, in order."""
    if not 0 <= min_instances <= max_instances or max_instances < 1:
        raise ValueError(f"--autoscale {min_instances}:{max_instances}: need 0 <= MIN <= MAX and MAX >= 1")
    check_hosts(role, instance_type)
    for adapter, uri in (adapters or {}).items():
        check_s3(f"--adapter {adapter}=", uri)
        if adapter_component(name, adapter) == base_component(name):
            raise ValueError(f"--adapter {adapter}=...: the name '{adapter}' would collide with the base component "
                             f"{base_component(name)}: choose another")
        if not uri.startswith("s3://") or not uri.endswith((".tar.gz", ".tgz")):
            raise ValueError(f"--adapter {adapter}={uri}: an adapter component's ArtifactUrl is the S3 URI of one "
                             "model.tar.gz (the adapter's files: adapter_config.json, adapter_model.safetensors)")
    if ami_version == "auto":
        ami_version = default_inference_ami(instance_type)
    if accelerators is None:
        accelerators = 1 if instance_type.startswith(GPU_FAMILIES) else 0
    environment = dict(environment or {})
    if adapters:  # the base's engine must be started able to take adapters it is handed later
        environment.setdefault("ENABLE_LORA", "true")
    variant = {"VariantName": VARIANT, "InstanceType": instance_type, "InitialInstanceCount": max(1, min_instances),
               "ManagedInstanceScaling": {"Status": "ENABLED", "MinInstanceCount": min_instances,
                                          "MaxInstanceCount": max_instances},
               "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"}}
    if ami_version:
        variant["InferenceAmiVersion"] = ami_version
    startup = {"ContainerStartupHealthCheckTimeoutInSeconds": startup_timeout}
    if download_timeout:
        startup["ModelDataDownloadTimeoutInSeconds"] = download_timeout
    resources = {"NumberOfCpuCoresRequired": 2, "MinMemoryRequiredInMb": memory_mb}
    if accelerators:
        resources["NumberOfAcceleratorDevicesRequired"] = accelerators
    base = base_component(name)
    return {
        "model": model_request(name=name, image=image, role=role, model_data=model_data, environment=environment),
        "config": {"EndpointConfigName": name, "ExecutionRoleArn": role, "ProductionVariants": [variant]},
        "endpoint": {"EndpointName": name, "EndpointConfigName": name},
        "base": {"InferenceComponentName": base, "EndpointName": name, "VariantName": VARIANT,
                 "Specification": {"ModelName": name, "StartupParameters": startup,
                                   "ComputeResourceRequirements": resources},
                 "RuntimeConfig": {"CopyCount": 1}},
        "adapters": [{"InferenceComponentName": adapter_component(name, adapter), "EndpointName": name,
                      "Specification": {"BaseInferenceComponentName": base, "Container": {"ArtifactUrl": uri}}}
                     for adapter, uri in sorted((adapters or {}).items())],
    }


def base_component(endpoint: str) -> str:
    return f"{endpoint}-base"


def adapter_component(endpoint: str, adapter: str) -> str:
    return f"{endpoint}-{adapter}"


def component_autoscaling_requests(*, component: str, min_copies: int, max_copies: int, target: float,
                                   invoked: tuple[str, ...] = ()) -> dict:
    """Autoscaling of a component's copy count: target tracking on concurrent requests per copy and, when
    min_copies is 0, the way back from zero (with no copy there is no per-copy metric: a request that found
    no capacity raises SageMaker's NoCapacityInvocationFailures, whose alarm adds one copy). `invoked`: the
    components requests name (the base and its adapters): each gets an alarm, all on the one step policy.
    The alarms' AlarmActions need the step policy's ARN, known only once it is put."""
    scalable = {"ServiceNamespace": "sagemaker", "ResourceId": f"inference-component/{component}",
                "ScalableDimension": "sagemaker:inference-component:DesiredCopyCount"}
    requests = _target_tracking(scalable, component, min_copies, max_copies, target,
                                "SageMakerInferenceComponentConcurrentRequestsPerCopyHighResolution")
    if min_copies == 0:
        requests["from_zero"] = {
            **scalable, "PolicyName": f"{component}-from-zero", "PolicyType": "StepScaling",
            "StepScalingPolicyConfiguration": {"AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Maximum",
                                               "Cooldown": 60,
                                               "StepAdjustments": [{"MetricIntervalLowerBound": 0,
                                                                    "ScalingAdjustment": 1}]}}
        requests["alarms"] = [{
            "AlarmName": no_capacity_alarm(name), "MetricName": "NoCapacityInvocationFailures",
            "Namespace": "AWS/SageMaker", "Statistic": "Maximum",
            "Dimensions": [{"Name": "InferenceComponentName", "Value": name}],
            "Period": 30, "EvaluationPeriods": 1, "DatapointsToAlarm": 1, "Threshold": 1.0,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold", "TreatMissingData": "missing"}
            for name in (component, *invoked)]
    return requests


def no_capacity_alarm(component: str) -> str:
    return f"{component}-no-capacity"


def model_request(*, name: str, image: str, role: str, model_data: str | None,
                  environment: dict[str, str] | None = None) -> dict:
    """CreateModel. model_data: a model.tar.gz (ModelDataUrl), an S3 prefix of the model's own files
    (ModelDataSource, CompressionType None: no tarball to pack or unpack, for large models), or None when
    the environment names the model (HF_MODEL_ID)."""
    container = {"Image": image, "Environment": dict(environment or {})}
    check_environment(container["Environment"])
    check_s3("--model-data", model_data)
    check_role(role)
    if model_data and model_data.endswith((".tar.gz", ".tgz")):
        container["ModelDataUrl"] = model_data
    elif model_data:
        container["ModelDataSource"] = {"S3DataSource": {"S3Uri": model_data.rstrip("/") + "/",
                                                         "S3DataType": "S3Prefix", "CompressionType": "None"}}
    elif "HF_MODEL_ID" not in container["Environment"]:
        raise ValueError("give the model: --model-data (a model.tar.gz or an S3 prefix of its files), "
                         "or --env HF_MODEL_ID=<hub id>")
    return {"ModelName": name, "ExecutionRoleArn": role, "PrimaryContainer": container}


def transform_requests(*, name: str, image: str, role: str, model_data: str, input_s3: str, output_s3: str,
                       instance_type: str, instance_count: int = 1, environment: dict[str, str] | None = None,
                       ami_version: str | None = "auto") -> dict[str, dict]:
    """CreateModel and CreateTransformJob for a batch of jsonlines requests (one TGI or chat request per line,
    one answer per line, in order). MaxConcurrentTransforms, MaxPayloadInMB and BatchStrategy are left to
    the container's GET /execution-parameters, which sizes them for its engines within SageMaker's limits."""
    if not model_data.endswith((".tar.gz", ".tgz")):
        raise ValueError(f"--model-data {model_data!r}: batch transform takes a model.tar.gz (it cannot load a "
                         "model's files from an S3 prefix: train without --uncompressed-output)")
    check_hosts(role, instance_type, instance_count)
    check_s3("--input", input_s3)
    check_s3("--output", output_s3)
    if ami_version == "auto":
        ami_version = default_transform_ami(instance_type)
    resources = {"InstanceType": instance_type, "InstanceCount": instance_count}
    if ami_version:
        resources["TransformAmiVersion"] = ami_version
    return {
        "model": model_request(name=name, image=image, role=role, model_data=model_data, environment=environment),
        "job": {
            "TransformJobName": name, "ModelName": name,
            "ModelClientConfig": {"InvocationsTimeoutInSeconds": TRANSFORM_INVOCATION_TIMEOUT,
                                  "InvocationsMaxRetries": 1},
            "Environment": {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MODEL_SERVER_TIMEOUT": str(TRANSFORM_SERVER_TIMEOUT)},
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_s3}},
                               "ContentType": "application/jsonlines", "SplitType": "Line", "CompressionType": "None"},
            "TransformOutput": {"S3OutputPath": output_s3, "Accept": "application/jsonlines", "AssembleWith": "Line"},
            "TransformResources": resources,
        },
    }


def redacted(request: dict, hidden: frozenset[str] | set[str] = frozenset()) -> dict:
    """The request as it may be printed: secrets in Environment masked, and the variables named in hidden
    (values taken from the caller's shell)."""
    def mask(env: dict) -> dict:
        return {k: ("****" if is_secret_name(k) or k in hidden else v) for k, v in env.items()}

    copy = json.loads(json.dumps(request))
    if "Environment" in copy:
        copy["Environment"] = mask(copy["Environment"])
    if "PrimaryContainer" in copy:
        copy["PrimaryContainer"]["Environment"] = mask(copy["PrimaryContainer"]["Environment"])
    return copy


def sse_events(parts: Iterable[dict]) -> Iterator[dict]:
    """Server-sent events from InvokeEndpointWithResponseStream's PayloadPart chunks. SageMaker cuts the
    byte stream anywhere (inside a line, inside a UTF-8 character), so bytes are buffered until an event
    is complete (a blank line) and only then decoded."""
    buffer = b""
    for part in parts:
        if "PayloadPart" not in part:
            error = next(iter(part.values()), {})
            raise RuntimeError(f"stream failed: {error}")
        buffer += part["PayloadPart"]["Bytes"]
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = "\n".join(line[5:].lstrip() for line in event.decode("utf-8").splitlines()
                             if line.startswith("data:"))
            if data and data != "[DONE]":
                yield json.loads(data)
