"""launch/ for hosting: the exact endpoint, inference-component and batch requests (botocore Stubber), secrets only
by reference, streamed answers re-assembled; and the pieces the other launch tests share. Training jobs:
test_launch_train.py; secrets: test_launch_secrets.py."""

import io
import json

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from launch.__main__ import main
from launch.api import sse_events

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-twin-sagemaker:abc123"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
HF_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/hf-token-AbCdEf"
WANDB_ARN = "arn:aws:ssm:us-east-1:123456789012:parameter/llm-twin/wandb-key"
MLFLOW_PASSWORD_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/mlflow-Xy12Zw"
SHELL_SECRETS = {"HF_TOKEN": "hf_secret_value", "WANDB_API_KEY": "wandb-secret-key",
                 "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-password", "MLFLOW_TRACKING_TOKEN": "mlflow-secret-token"}


@pytest.fixture(autouse=True)
def no_secrets_in_the_shell(monkeypatch):
    """What the tests' own shell holds must not change what launch sends or refuses."""
    for name in [*SHELL_SECRETS, "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_USERNAME", "WANDB_PROJECT"]:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name + "_SECRET_ARN", raising=False)


def client(name):
    return boto3.client(name, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")


def test_deploy_and_delete_send_the_exact_requests():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/twin"}, {
            "ModelName": "twin", "ExecutionRoleArn": ROLE,
            "PrimaryContainer": {"Image": IMAGE, "ModelDataUrl": "s3://b/out/model.tar.gz",
                                 "Environment": {"MAX_BATCH_SIZE": "16"}}})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/twin"}, {
            "EndpointConfigName": "twin", "ProductionVariants": [{
                "VariantName": "AllTraffic", "ModelName": "twin", "InstanceType": "ml.g5.xlarge",
                "InitialInstanceCount": 1,
                "ContainerStartupHealthCheckTimeoutInSeconds": 600,
                "InferenceAmiVersion": "al2-ami-sagemaker-inference-gpu-3-1"}]})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/twin"},
                          {"EndpointName": "twin", "EndpointConfigName": "twin"})
        stub.add_response("list_inference_components", {"InferenceComponents": []},
                          {"EndpointNameEquals": "twin", "MaxResults": 100})
        stub.add_response("delete_endpoint", {}, {"EndpointName": "twin"})
        stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "twin"})
        stub.add_response("delete_model", {}, {"ModelName": "twin"})
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/out/model.tar.gz",
                     "--name", "twin", "--instance-type", "ml.g5.xlarge", "--startup-timeout", "600",
                     "--env", "MAX_BATCH_SIZE=16",
                     "--inference-ami-version", "al2-ami-sagemaker-inference-gpu-3-1"],
                    clients={"sagemaker": sm}) == 0
        assert main(["delete", "--name", "twin"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()


def test_gpu_endpoints_get_the_driver_580_host_image_by_default():
    """CUDA 13.0 needs driver 580 (or 535+ with forward compatibility); g5's default host image has 470."""
    from launch.api import endpoint_requests

    def variant(instance_type, **kwargs):
        return endpoint_requests(name="t", image=IMAGE, role=ROLE, model_data="s3://b/m.tar.gz",
                                 instance_type=instance_type, **kwargs)["config"]["ProductionVariants"][0]

    for gpu in ("ml.g5.2xlarge", "ml.g4dn.xlarge", "ml.g6e.12xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"):
        assert variant(gpu)["InferenceAmiVersion"] == "al2023-ami-sagemaker-inference-gpu-4-1"
    assert "InferenceAmiVersion" not in variant("ml.m5.xlarge")
    assert "InferenceAmiVersion" not in variant("ml.g5.2xlarge", ami_version=None)
    sm = client("sagemaker")
    assert "al2023-ami-sagemaker-inference-gpu-4-1" in sm.meta.service_model.shape_for(
        "ProductionVariantInferenceAmiVersion").enum
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/t"})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/t"},
                          {"EndpointConfigName": "t",
                           "ProductionVariants": [variant("ml.g5.2xlarge", startup_timeout=900) | {"ModelName": "t"}]})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/t"})
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "t"],
                    clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()


def test_invoke_sends_the_llm_twin_request(capsys):
    runtime = client("sagemaker-runtime")
    answer = json.dumps([{"generated_text": "Measure first."}]).encode()
    body = {"inputs": "Write a post", "parameters": {"max_new_tokens": 150, "return_full_text": False}, "stream": False}
    with Stubber(runtime) as stub:
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(answer), len(answer))},
                          {"EndpointName": "twin", "ContentType": "application/json", "Body": json.dumps(body)})
        assert main(["invoke", "--name", "twin", "--inputs", "Write a post"],
                    clients={"sagemaker-runtime": runtime}) == 0
    assert capsys.readouterr().out.strip() == "Measure first."


STREAM = ("data:" + json.dumps({"index": 1, "token": {"id": 5, "text": "Caf\u00e9 ", "special": False}}) + "\n\n"
          + "data:" + json.dumps({"index": 2, "token": {"id": 6, "text": "\u2713 done", "special": False}},
                                 ensure_ascii=False)
          + "\n\n" + "data:" + json.dumps({"index": 3, "token": {"id": 2, "text": "", "special": True},
                                           "generated_text": "Caf\u00e9 \u2713 done"}, ensure_ascii=False)
          + "\n\n").encode()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_streamed_events_survive_any_chunk_boundary(size):
    parts = [{"PayloadPart": {"Bytes": STREAM[i:i + size]}} for i in range(0, len(STREAM), size)]
    events = list(sse_events(parts))
    assert [e["index"] for e in events] == [1, 2, 3]
    assert events[-1]["generated_text"] == "Caf\u00e9 \u2713 done"  # multi-byte characters split across parts


def test_a_stream_error_part_is_raised():
    with pytest.raises(RuntimeError, match="ModelStreamError"):
        list(sse_events([{"ModelStreamError": {"Message": "ModelStreamError: StreamBroken"}}]))


def test_batch_sends_the_exact_transform_job_with_the_driver_535_host_image():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/twin-batch"}, {
            "ModelName": "twin-batch", "ExecutionRoleArn": ROLE,
            "PrimaryContainer": {"Image": IMAGE, "ModelDataUrl": "s3://b/out/model.tar.gz",
                                 "Environment": {"MAX_BATCH_SIZE": "64"}}})
        stub.add_response("create_transform_job",
                          {"TransformJobArn": "arn:aws:sagemaker:us-east-1:1:transform-job/twin-batch"}, {
            "TransformJobName": "twin-batch", "ModelName": "twin-batch",
            "ModelClientConfig": {"InvocationsTimeoutInSeconds": 3600, "InvocationsMaxRetries": 1},
            "Environment": {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3540"},
            "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/prompts/"}},
                               "ContentType": "application/jsonlines", "SplitType": "Line", "CompressionType": "None"},
            "TransformOutput": {"S3OutputPath": "s3://b/answers/", "Accept": "application/jsonlines",
                                "AssembleWith": "Line"},
            "TransformResources": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2,
                                   "TransformAmiVersion": "al2-ami-sagemaker-batch-gpu-535"}})
        assert main(["batch", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/out/model.tar.gz",
                     "--input", "s3://b/prompts/", "--output", "s3://b/answers/", "--name", "twin-batch",
                     "--instance-count", "2", "--env", "MAX_BATCH_SIZE=64"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    from launch.api import transform_requests

    cpu = transform_requests(name="n", image=IMAGE, role=ROLE, model_data="s3://b/m.tar.gz", input_s3="s3://b/i",
                             output_s3="s3://b/o", instance_type="ml.m5.xlarge")
    assert "TransformAmiVersion" not in cpu["job"]["TransformResources"]


def test_deploy_uncompressed_model_data_async_and_autoscaling_send_the_exact_requests(capsys):
    sm, autoscaling = client("sagemaker"), client("application-autoscaling")
    with Stubber(sm) as stub, Stubber(autoscaling) as scaling:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/big"}, {
            "ModelName": "big", "ExecutionRoleArn": ROLE, "PrimaryContainer": {
                "Image": IMAGE, "Environment": {},
                "ModelDataSource": {"S3DataSource": {"S3Uri": "s3://b/out/job/output/model/", "S3DataType": "S3Prefix",
                                                     "CompressionType": "None"}}}})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/big"}, {
            "EndpointConfigName": "big", "ProductionVariants": [{
                "VariantName": "AllTraffic", "ModelName": "big", "InstanceType": "ml.g6e.12xlarge",
                "InitialInstanceCount": 1,
                "ContainerStartupHealthCheckTimeoutInSeconds": 1800, "ModelDataDownloadTimeoutInSeconds": 2400,
                "InferenceAmiVersion": "al2023-ami-sagemaker-inference-gpu-4-1"}]})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/big"},
                          {"EndpointName": "big", "EndpointConfigName": "big"})
        stub.add_response("describe_endpoint", {  # the waiter: autoscaling registers an in-service variant
            "EndpointName": "big", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/big",
            "EndpointConfigName": "big", "EndpointStatus": "InService", "CreationTime": "2026-11-27T00:00:00Z",
            "LastModifiedTime": "2026-11-27T00:00:00Z"},
            {"EndpointName": "big"})
        resource = {"ServiceNamespace": "sagemaker", "ResourceId": "endpoint/big/variant/AllTraffic",
                    "ScalableDimension": "sagemaker:variant:DesiredInstanceCount"}
        scaling.add_response("register_scalable_target", {}, {**resource, "MinCapacity": 1, "MaxCapacity": 4})
        scaling.add_response("put_scaling_policy", {"PolicyARN": "arn:aws:autoscaling:us-east-1:1:scalingPolicy:x"}, {
            **resource, "PolicyName": "big-concurrent-requests", "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": 24.0, "ScaleOutCooldown": 60, "ScaleInCooldown": 300,
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantConcurrentRequestsPerModelHighResolution"}}})
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/out/job/output/model",
                     "--name", "big", "--instance-type", "ml.g6e.12xlarge", "--startup-timeout", "1800",
                     "--download-timeout", "2400", "--autoscale", "1:4", "--autoscale-target", "24"],
                    clients={"sagemaker": sm, "application-autoscaling": autoscaling}) == 0
        stub.assert_no_pending_responses()
        scaling.assert_no_pending_responses()
    with pytest.raises(SystemExit, match="scaling to zero needs inference components"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--autoscale", "0:2"], clients={"sagemaker": sm})
    with pytest.raises(SystemExit, match="scale an async endpoint on its backlog"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--autoscale", "1:2", "--async", "s3://b/async/"], clients={"sagemaker": sm})


def test_deploy_async_writes_answers_to_s3_and_lets_requests_run_long():
    from launch.api import endpoint_requests

    requests = endpoint_requests(name="a", image=IMAGE, role=ROLE, model_data="s3://b/m.tgz",
                                 instance_type="ml.g5.xlarge", async_output="s3://b/async/", async_concurrency=8)
    assert requests["config"]["AsyncInferenceConfig"] == {"OutputConfig": {"S3OutputPath": "s3://b/async/"},
                                                          "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 8}}
    container = requests["model"]["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://b/m.tgz"  # a .tgz is a tarball too
    assert container["Environment"] == {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "3540"}


def test_deploy_by_hf_model_id_needs_no_model_data_and_takes_the_token_by_reference(capsys):
    from launch.api import model_request

    request = model_request(name="book", image=IMAGE, role=ROLE, model_data=None,
                            environment={"HF_MODEL_ID": "meta-llama/Llama-3.1-8B",
                                         "HUGGING_FACE_HUB_TOKEN_SECRET_ARN": HF_ARN})
    assert "ModelDataUrl" not in request["PrimaryContainer"] and "ModelDataSource" not in request["PrimaryContainer"]
    with pytest.raises(ValueError, match="give the model: --model-data"):
        model_request(name="none", image=IMAGE, role=ROLE, model_data=None)
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/book"},
                          {**request, "ModelName": "book"})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/book"})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/book"})
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--name", "book",
                     "--env", "HF_MODEL_ID=meta-llama/Llama-3.1-8B",
                     "--secret", f"HUGGING_FACE_HUB_TOKEN={HF_ARN}"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()
    assert f'"HUGGING_FACE_HUB_TOKEN_SECRET_ARN": "{HF_ARN}"' in capsys.readouterr().out


def _component(name, status="InService"):
    return {"InferenceComponentName": name,
            "InferenceComponentArn": f"arn:aws:sagemaker:us-east-1:1:inference-component/{name}",
            "EndpointName": "twins", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/twins",
            "VariantName": "AllTraffic", "InferenceComponentStatus": status, "CreationTime": "2026-11-27T00:00:00Z",
            "LastModifiedTime": "2026-11-27T00:00:00Z"}


def test_deploy_inference_components_with_adapters_and_scale_to_zero_send_the_exact_requests(monkeypatch, capsys):
    """The base model as one component, each twin's adapter as its own, managed instance scaling down to 0
    instances, copy-count target tracking, and the alarm that brings a copy back from zero; delete takes the
    adapters down before their base, and the base before the endpoint."""
    import launch.__main__ as launch_main

    monkeypatch.setattr(launch_main, "POLL_SECONDS", 0)
    sm, autoscaling, cloudwatch = client("sagemaker"), client("application-autoscaling"), client("cloudwatch")
    runtime = client("sagemaker-runtime")
    with Stubber(sm) as stub, Stubber(autoscaling) as scaling, Stubber(cloudwatch) as alarms, Stubber(runtime) as rt:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/twins"}, {
            "ModelName": "twins", "ExecutionRoleArn": ROLE, "PrimaryContainer": {
                "Image": IMAGE, "Environment": {"ENABLE_LORA": "true"},
                "ModelDataSource": {"S3DataSource": {"S3Uri": "s3://b/base/", "S3DataType": "S3Prefix",
                                                     "CompressionType": "None"}}}})
        stub.add_response("create_endpoint_config",
                          {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:1:endpoint-config/twins"}, {
            "EndpointConfigName": "twins", "ExecutionRoleArn": ROLE, "ProductionVariants": [{
                "VariantName": "AllTraffic", "InstanceType": "ml.g5.2xlarge", "InitialInstanceCount": 1,
                "ManagedInstanceScaling": {"Status": "ENABLED", "MinInstanceCount": 0, "MaxInstanceCount": 2},
                "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
                "InferenceAmiVersion": "al2023-ami-sagemaker-inference-gpu-4-1"}]})
        stub.add_response("create_endpoint", {"EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/twins"},
                          {"EndpointName": "twins", "EndpointConfigName": "twins"})
        stub.add_response("describe_endpoint", {
            "EndpointName": "twins", "EndpointArn": "arn:aws:sagemaker:us-east-1:1:endpoint/twins",
            "EndpointConfigName": "twins", "EndpointStatus": "InService", "CreationTime": "2026-11-27T00:00:00Z",
            "LastModifiedTime": "2026-11-27T00:00:00Z"},
            {"EndpointName": "twins"})
        stub.add_response("create_inference_component",
                          {"InferenceComponentArn": "arn:aws:sagemaker:us-east-1:1:inference-component/twins-base"}, {
            "InferenceComponentName": "twins-base", "EndpointName": "twins", "VariantName": "AllTraffic",
            "Specification": {"ModelName": "twins",
                              "StartupParameters": {"ContainerStartupHealthCheckTimeoutInSeconds": 900},
                              "ComputeResourceRequirements": {"NumberOfCpuCoresRequired": 2,
                                                              "MinMemoryRequiredInMb": 5120,
                                                              "NumberOfAcceleratorDevicesRequired": 1}},
            "RuntimeConfig": {"CopyCount": 1}})
        for status in ("Creating", "InService"):
            described = {k: v for k, v in _component("twins-base", status).items() if k != "InferenceComponentStatus"}
            stub.add_response("describe_inference_component", {**described, "InferenceComponentStatus": status},
                              {"InferenceComponentName": "twins-base"})
        for adapter in ("alice", "bob"):
            stub.add_response("create_inference_component", {
                "InferenceComponentArn": f"arn:aws:sagemaker:us-east-1:1:inference-component/twins-{adapter}"}, {
                "InferenceComponentName": f"twins-{adapter}", "EndpointName": "twins",
                "Specification": {"BaseInferenceComponentName": "twins-base",
                                  "Container": {"ArtifactUrl": f"s3://b/{adapter}/model.tar.gz"}}})
        resource = {"ServiceNamespace": "sagemaker", "ResourceId": "inference-component/twins-base",
                    "ScalableDimension": "sagemaker:inference-component:DesiredCopyCount"}
        scaling.add_response("register_scalable_target", {}, {**resource, "MinCapacity": 0, "MaxCapacity": 2})
        scaling.add_response("put_scaling_policy",
                             {"PolicyARN": "arn:aws:autoscaling:us-east-1:1:scalingPolicy:track"}, {
            **resource, "PolicyName": "twins-base-concurrent-requests", "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": {
                "TargetValue": 16.0, "ScaleOutCooldown": 60, "ScaleInCooldown": 300,
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerInferenceComponentConcurrentRequestsPerCopyHighResolution"}}})
        scaling.add_response("put_scaling_policy",
                             {"PolicyARN": "arn:aws:autoscaling:us-east-1:1:scalingPolicy:zero"}, {
            **resource, "PolicyName": "twins-base-from-zero", "PolicyType": "StepScaling",
            "StepScalingPolicyConfiguration": {"AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Maximum",
                                               "Cooldown": 60,
                                               "StepAdjustments": [{"MetricIntervalLowerBound": 0,
                                                                    "ScalingAdjustment": 1}]}})
        for component in ("twins-base", "twins-alice", "twins-bob"):  # a request to any of them may find no copy
            alarms.add_response("put_metric_alarm", {}, {
                "AlarmName": f"{component}-no-capacity", "MetricName": "NoCapacityInvocationFailures",
                "Namespace": "AWS/SageMaker", "Statistic": "Maximum",
                "Dimensions": [{"Name": "InferenceComponentName", "Value": component}],
                "Period": 30, "EvaluationPeriods": 1, "DatapointsToAlarm": 1, "Threshold": 1.0,
                "ComparisonOperator": "GreaterThanOrEqualToThreshold", "TreatMissingData": "missing",
                "AlarmActions": ["arn:aws:autoscaling:us-east-1:1:scalingPolicy:zero"]})
        rt.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(b'[{"generated_text": "hi"}]'), 26)}, {
            "EndpointName": "twins", "InferenceComponentName": "twins-alice", "ContentType": "application/json",
            "Body": json.dumps({"inputs": "Write a post",
                                "parameters": {"max_new_tokens": 150, "return_full_text": False},
                                "stream": False})})
        everything = [_component(n) for n in ("twins-base", "twins-alice", "twins-bob")]
        listing = {"EndpointNameEquals": "twins", "MaxResults": 100}
        stub.add_response("list_inference_components", {"InferenceComponents": everything[:2], "NextToken": "page2"},
                          listing)
        stub.add_response("list_inference_components", {"InferenceComponents": everything[2:]},
                          {**listing, "NextToken": "page2"})  # pages are followed: none is left behind
        for adapter in ("alice", "bob"):
            stub.add_response("delete_inference_component", {}, {"InferenceComponentName": f"twins-{adapter}"})
        stub.add_response("list_inference_components", {"InferenceComponents": everything}, listing)
        stub.add_response("list_inference_components", {"InferenceComponents": everything[:1]}, listing)
        stub.add_response("delete_inference_component", {}, {"InferenceComponentName": "twins-base"})
        stub.add_response("list_inference_components", {"InferenceComponents": []}, listing)
        names = ["twins-base-no-capacity", "twins-alice-no-capacity", "twins-bob-no-capacity"]
        alarms.add_response("describe_alarms", {"MetricAlarms": [{"AlarmName": "twins-base-no-capacity"}]},
                            {"AlarmNames": names})
        alarms.add_response("delete_alarms", {}, {"AlarmNames": names})
        scaling.add_response("describe_scalable_targets", {"ScalableTargets": [{
            **resource, "MinCapacity": 0, "MaxCapacity": 2, "RoleARN": ROLE, "CreationTime": "2026-11-27T00:00:00Z"}]},
            {"ServiceNamespace": "sagemaker", "ResourceIds": ["inference-component/twins-base"],
             "ScalableDimension": "sagemaker:inference-component:DesiredCopyCount"})
        scaling.add_response("deregister_scalable_target", {}, resource)
        stub.add_response("delete_endpoint", {}, {"EndpointName": "twins"})
        stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "twins"})
        stub.add_response("delete_model", {}, {"ModelName": "twins"})
        clients = {"sagemaker": sm, "application-autoscaling": autoscaling, "cloudwatch": cloudwatch,
                   "sagemaker-runtime": runtime}
        assert main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/base/", "--name", "twins",
                     "--adapter", "alice=s3://b/alice/model.tar.gz", "--adapter", "bob=s3://b/bob/model.tar.gz",
                     "--autoscale", "0:2"], clients=clients) == 0
        assert main(["invoke", "--name", "twins", "--component", "twins-alice", "--inputs", "Write a post"],
                    clients=clients) == 0
        assert main(["delete", "--name", "twins"], clients=clients) == 0
        for stubbed in (stub, scaling, alarms, rt):
            stubbed.assert_no_pending_responses()
    out = capsys.readouterr().out
    assert "twins-base, twins-alice, twins-bob" in out and "hi" in out


def test_inference_components_refuse_async_and_a_bad_adapter_clearly():
    sm = client("sagemaker")
    with pytest.raises(SystemExit, match="--async endpoints host one model"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--inference-components", "--async", "s3://b/async/"], clients={"sagemaker": sm})
    with pytest.raises(SystemExit, match="--adapter expects KEY=VALUE, got 's3://b/a.tar.gz'"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--adapter", "s3://b/a.tar.gz"], clients={"sagemaker": sm})
    with pytest.raises(SystemExit, match="ArtifactUrl is the S3 URI of one model.tar.gz"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--adapter", "alice=s3://b/alice/"], clients={"sagemaker": sm})
    with pytest.raises(SystemExit, match="would collide with the base component z-base"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--adapter", "base=s3://b/a/model.tar.gz"], clients={"sagemaker": sm})
    with pytest.raises(SystemExit, match="need 0 <= MIN <= MAX"):
        main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "z",
              "--inference-components", "--autoscale", "3:1"], clients={"sagemaker": sm})


def test_a_deploy_that_failed_half_way_is_deleted_and_aws_refusals_are_one_line():
    sm = client("sagemaker")
    with Stubber(sm) as stub:
        stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:123456789012:model/twin"})
        stub.add_client_error("create_endpoint_config", "ResourceLimitExceeded", "account-level service limit")
        with pytest.raises(SystemExit) as refused:
            main(["deploy", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/m.tar.gz", "--name", "twin"],
                 clients={"sagemaker": sm})
        assert str(refused.value.code).startswith("launch: AWS refused: An error occurred (ResourceLimitExceeded)")
        assert "`python -m launch delete --name twin` removes what deploy created" in str(refused.value.code)
        stub.add_response("list_inference_components", {"InferenceComponents": []})
        stub.add_client_error("delete_endpoint", "ValidationException", 'Could not find endpoint "twin".')
        stub.add_client_error("delete_endpoint_config", "ValidationException",
                              'Could not find endpoint configuration "twin".')
        stub.add_response("delete_model", {}, {"ModelName": "twin"})
        assert main(["delete", "--name", "twin"], clients={"sagemaker": sm}) == 0
        stub.assert_no_pending_responses()


@pytest.mark.parametrize("argv, message", [
    (["--train", "./data"], "--train './data': expected an S3 URI"),
    (["--role", "SageMakerRole"], "--role 'SageMakerRole': expected an IAM role's ARN"),
    (["--instance-type", "g5.2xlarge"], "expected a SageMaker instance type, e.g. ml.g5.2xlarge"),
    (["--instance-count", "0"], "--instance-count 0: expected 1 or more"),
    (["--volume-size", "0"], "--volume-size 0: expected 1 to 16384 (GB)"),
    (["--spot", "--checkpoints", "s3://b/c/", "--max-run", "7200", "--max-wait", "3600"],
     "--max-wait 3600 is below --max-run 7200"),
    (["--max-wait", "3600"], "give --spot too"),
    (["--hyperparameters", "/no/such.json"], "--hyperparameters /no/such.json: No such file"),
])
def test_train_refuses_what_sagemaker_would_refuse_only_after_starting(argv, message):
    flags = ["--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/", *argv]  # last wins
    with pytest.raises(SystemExit) as refused:
        main(["train", *flags], clients={"sagemaker": client("sagemaker")})
    assert message in str(refused.value.code)


def test_hyperparameters_file_must_hold_an_object_and_batch_a_tarball(tmp_path):
    listed = tmp_path / "hp.json"
    listed.write_text('["lora_r", 8]')
    with pytest.raises(SystemExit, match="expected a JSON object of name: value, got list"):
        main(["train", "--image", IMAGE, "--role", ROLE, "--train", "s3://b/t/", "--output", "s3://b/o/",
              "--hyperparameters", str(listed)], clients={"sagemaker": client("sagemaker")})
    with pytest.raises(SystemExit, match="batch transform takes a model.tar.gz"):
        main(["batch", "--image", IMAGE, "--role", ROLE, "--model-data", "s3://b/out/job/output/model/",
              "--input", "s3://b/i/", "--output", "s3://b/o/"], clients={"sagemaker": client("sagemaker")})
