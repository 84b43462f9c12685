import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args, env=None):
    return subprocess.run([str(BIN / "llm-twin"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_unknown_verb_suggests_the_nearest_and_in_a_training_job_says_it_as_the_failure(tmp_path):
    result = run("trian")
    assert result.returncode != 0
    assert "unknown verb 'trian': did you mean 'train'?" in result.stderr
    (tmp_path / "input" / "config").mkdir(parents=True)  # a training job whose ContainerArguments replaced `train`
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text("{}")
    result = run("--epochs", "3", env={"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert (tmp_path / "output" / "failure").read_text().startswith("unknown verb '--epochs': did you mean")


def test_other_commands_run_for_debugging():
    result = run("echo", "inside the image")
    assert result.returncode == 0 and result.stdout.strip() == "inside the image"


def test_no_argument_means_train(tmp_path):
    """SageMaker SDK v3 local mode starts training containers without a command."""
    result = run(env={"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert result.returncode != 0
    assert "input channel 'train' is missing" in (tmp_path / "output" / "failure").read_text()


PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 19:39:15 UTC 2024\n"
               "GCC version: gcc 7\n")
TOO_OLD = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"
           "GCC version: gcc 7\n")
OPEN_MODULE = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder)\n"


def fake_gpu_host(tmp_path, driver_line,
                  compat_libs=("libcuda.so.1", "libcuda.so.580.95.05", "libnvidia-ptxjitcompiler.so.580.95.05")):
    version_file = tmp_path / "version"
    version_file.write_text(driver_line)
    compat = tmp_path / "compat"
    compat.mkdir()
    for name in compat_libs:
        (compat / name).write_bytes(b"")
    device = tmp_path / "nvidiactl"  # a GPU mapped into the container
    device.write_bytes(b"")
    return {"LLM_TWIN_NVIDIA_VERSION_FILE": str(version_file), "LLM_TWIN_CUDA_COMPAT_DIR": str(compat),
            "LLM_TWIN_NVIDIA_DEVICE": str(device)}


def test_an_old_host_driver_gets_the_cuda_compat_libraries_first(tmp_path):
    env = fake_gpu_host(tmp_path, PROPRIETARY)
    result = run("sh", "-c", 'echo "$LD_LIBRARY_PATH"', env={**env, "LD_LIBRARY_PATH": "/opt/other"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'compat'}:/opt/other"
    assert "host NVIDIA driver 535.183.1 is older than this image's CUDA (driver 580.95.5)" in result.stderr


def test_a_driver_too_old_for_forward_compatibility_is_refused_naming_the_setting(tmp_path):
    """R470 (SageMaker's default on g4dn/g5/p4d endpoints and batch) cannot run CUDA 13 even with compat."""
    env = {**fake_gpu_host(tmp_path, TOO_OLD), "SAGEMAKER_BASE_DIR": str(tmp_path / "ml")}
    message = "the host's NVIDIA driver 470.256.2 is too old for this image's CUDA (driver 580, or 535+"
    served = run("serve", env=env)
    assert served.returncode == 1 and message in served.stderr
    assert "InferenceAmiVersion=al2023-ami-sagemaker-inference-gpu-4-1" in served.stderr
    trained = run("train", env=env)
    assert trained.returncode == 1 and "training jobs have no host-image setting" in trained.stderr
    assert message in (tmp_path / "ml" / "output" / "failure").read_text()  # DescribeTrainingJob's FailureReason
    # A debugging command still runs there, with the warning; and with no GPU mapped in, nothing is refused.
    looked = run("echo", "inside", env=env)
    assert looked.returncode == 0 and looked.stdout.strip() == "inside" and message in looked.stderr
    no_gpu = run("serve", "--help", env={**env, "LLM_TWIN_NVIDIA_DEVICE": str(tmp_path / "absent")})
    assert message not in no_gpu.stderr


def test_a_gpu_older_than_the_images_cuda_is_refused_naming_the_instances_that_run_it(tmp_path):
    """A p3's V100 (compute capability 7.0): CUDA 13 has no kernels for it."""
    env = {**fake_gpu_host(tmp_path, OPEN_MODULE), "SAGEMAKER_BASE_DIR": str(tmp_path / "ml")}
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'Tesla V100-SXM2-16GB, 7.0'\n")
    (tools / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{tools}:{os.environ['PATH']}"
    trained = run("train", env=env)
    assert trained.returncode == 1 and "GPU Tesla V100-SXM2-16GB (compute capability 7.0) is older" in trained.stderr
    assert "compute capability 7.0" in (tmp_path / "ml" / "output" / "failure").read_text()
    (tools / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA A10G, 8.6'\n")
    assert "is older than" not in run("echo", env=env).stderr


def test_the_same_driver_branch_needs_no_compatibility_libraries(tmp_path):
    """580.65 and the image's 580.95 are one branch: minor version compatibility, no compat libcuda."""
    env = fake_gpu_host(tmp_path, OPEN_MODULE.replace("580.95.05", "580.65.06"))
    result = run("sh", "-c", 'echo "[$LD_LIBRARY_PATH]"', env={**env, "LD_LIBRARY_PATH": ""})
    assert result.returncode == 0 and result.stdout.strip() == "[]" and result.stderr == ""


def test_train_and_serve_keep_caches_and_temporary_files_on_the_storage_volume(tmp_path):
    from container.entrypoint import SCRATCH_VARIABLES, scratch_environment

    ml = tmp_path / "ml"
    train = scratch_environment("train", {"SAGEMAKER_BASE_DIR": str(ml)})
    assert train == {"HF_HOME": f"{ml}/input/scratch/huggingface", "XDG_CACHE_HOME": f"{ml}/input/scratch/cache",
                     "TRITON_CACHE_DIR": f"{ml}/input/scratch/triton", "TMPDIR": f"{ml}/input/scratch/tmp"}
    assert all(Path(path).is_dir() for path in train.values())
    # What the user set stays (an XDG_CACHE_HOME keeps Hugging Face's default under it); an endpoint's
    # volume is mounted at /tmp, where temporary files already go.
    assert "HF_HOME" not in scratch_environment("train", {"SAGEMAKER_BASE_DIR": str(ml), "HF_HOME": "/mine"})
    assert "HF_HOME" not in scratch_environment("train", {"SAGEMAKER_BASE_DIR": str(ml), "XDG_CACHE_HOME": "/c"})
    served = scratch_environment("serve", {}, endpoint_volume=tmp_path / "volume")
    assert served["HF_HOME"] == f"{tmp_path}/volume/huggingface" and "TMPDIR" not in served
    # Through the real entrypoint: a training job that fails at once has already made its scratch folders.
    clean = {k: v for k, v in os.environ.items() if k not in SCRATCH_VARIABLES}
    subprocess.run([str(BIN / "llm-twin"), "train"], capture_output=True, timeout=60,
                   env={**clean, "SAGEMAKER_BASE_DIR": str(ml / "job")})
    assert (ml / "job" / "input" / "scratch" / "tmp").is_dir()


def test_a_new_enough_driver_or_no_gpu_leaves_the_library_path_alone(tmp_path):
    newer = fake_gpu_host(tmp_path, OPEN_MODULE)
    no_gpu = {**newer, "LLM_TWIN_NVIDIA_VERSION_FILE": str(tmp_path / "absent")}
    for env in (newer, no_gpu):
        result = run("sh", "-c", 'echo "[$LD_LIBRARY_PATH]"', env={**env, "LD_LIBRARY_PATH": ""})
        assert result.returncode == 0 and result.stdout.strip() == "[]" and result.stderr == ""


def test_driver_versions_are_read_from_both_kernel_module_flavours(tmp_path):
    from container import cuda_compat

    gpu = tmp_path / "nvidiactl"
    gpu.write_bytes(b"")
    (tmp_path / "v").write_text(OPEN_MODULE)
    assert cuda_compat.host_driver_version(tmp_path / "v", gpu) == (580, 95, 5)
    (tmp_path / "v").write_text(PROPRIETARY)
    assert cuda_compat.host_driver_version(tmp_path / "v", gpu) == (535, 183, 1)
    assert cuda_compat.host_driver_version(tmp_path / "v", tmp_path / "no-gpu-mapped") is None
    (tmp_path / "v").write_text("garbage")
    assert cuda_compat.host_driver_version(tmp_path / "v", gpu) is None
    assert cuda_compat.compat_driver_version(tmp_path / "no-such-dir") is None



def test_the_entrypoint_holds_sigterm_across_the_exec_into_train_and_serve(monkeypatch):
    """In a container PID 1 ignores a signal it has no handler for, and SageMaker's SIGKILL follows: so
    the entrypoint handles SIGTERM itself, and blocks it (held, not lost) across the exec until train's or
    serve's handler exists."""
    import signal

    from container import entrypoint

    masks = {}

    def execv(path, argv):
        masks[argv[2]] = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise SystemExit(0)

    monkeypatch.setattr(entrypoint.os, "execv", execv)
    monkeypatch.setattr(entrypoint, "use_cuda_compat", lambda verb: None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        for verb in ("train", "serve"):
            try:
                entrypoint.main([verb])
            except SystemExit:
                pass
        assert signal.getsignal(signal.SIGTERM) == entrypoint._stopped
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert masks == {"train": True, "serve": True}


def test_a_sigterm_held_across_the_exec_is_taken_by_trains_handler(tmp_path):
    """What the entrypoint hands over: SIGTERM blocked and already pending. train takes it: exit 143, failure file."""
    held = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
            "os.kill(os.getpid(), signal.SIGTERM); os.execv(sys.executable, [sys.executable, '-m', 'train'])")
    result = subprocess.run([sys.executable, "-c", held], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stdout + result.stderr
    assert (tmp_path / "output" / "failure").read_text().startswith(
        "training stopped by SIGTERM while reading the configuration")


def test_a_sigterm_held_across_the_exec_is_taken_by_serves_handler(tmp_path):
    """serve unblocks SIGTERM only once its handler is in place: one pending from the exec ends it, exit 143."""
    held = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
            "os.kill(os.getpid(), signal.SIGTERM); os.execv(sys.executable, [sys.executable, '-m', 'serve'])")
    result = subprocess.run([sys.executable, "-c", held], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 143, result.stdout + result.stderr
    assert "serve: stopped by SIGTERM before the server started" in result.stderr


def test_serve_stops_at_once_on_sigterm_while_it_downloads_hf_model_id(tmp_path):
    """The download can take minutes; a SIGTERM then (scale-in, an update) ends it at once with exit 143,
    rather than being ignored by a PID 1 with no handler until SageMaker's SIGKILL."""
    import socket
    import time

    hub = socket.socket()  # a hub that accepts the connection and never answers
    hub.bind(("127.0.0.1", 0))
    hub.listen(8)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path), "HF_MODEL_ID": "someone/some-model",
           "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}", "HF_HUB_ETAG_TIMEOUT": "300",
           "HF_HUB_DOWNLOAD_TIMEOUT": "300", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    serve = subprocess.Popen([sys.executable, "-m", "serve"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        hub.settimeout(120)
        connection, _ = hub.accept()  # the download has started
        time.sleep(0.5)
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=60)
        connection.close()
    finally:
        serve.kill()
        hub.close()
    assert serve.returncode == 143, output
    assert "stopped by SIGTERM before the server started" in output


HF_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/hf-token-AbCdEf"
MLFLOW_ARN = "arn:aws:ssm:eu-west-1:123456789012:parameter/llm-twin/mlflow-password"
DENIED_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:llm-twin/not-ours-Zz99Yy"
STORED = {HF_ARN: "hf_secret_value", MLFLOW_ARN: "mlflow-secret-password"}


class _SecretStore(BaseHTTPRequestHandler):
    """Secrets Manager's GetSecretValue and SSM's GetParameter, answered from STORED: any other ARN is
    AccessDeniedException. Each request is recorded as (X-Amz-Target, body, the region it was signed for)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        target = self.headers["X-Amz-Target"]
        self.server.asked.append((target, body, self.headers["Authorization"].split("/")[2]))
        value = STORED.get(body.get("SecretId") or body.get("Name"))
        if value is None:
            status, answer = 400, {"__type": "AccessDeniedException", "message": "not authorized"}
        elif target.startswith("secretsmanager."):
            status, answer = 200, {"SecretString": value}
        else:
            status, answer = 200, {"Parameter": {"Name": "/llm-twin/mlflow-password", "Type": "SecureString",
                                                 "Value": value}}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def secret_store():
    """The stores on localhost, and the environment that sends boto3 there with harmless credentials."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SecretStore)
    server.asked = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.endswith("_SECRET_ARN")
               and k not in ("HF_TOKEN", "MLFLOW_TRACKING_PASSWORD")}
    environ.update({"AWS_ENDPOINT_URL_SECRETS_MANAGER": url, "AWS_ENDPOINT_URL_SSM": url, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"})
    yield server, environ
    server.shutdown()
    server.server_close()


def run_with(environ, *args, **extra):
    return subprocess.run([str(BIN / "llm-twin"), *args], capture_output=True, text=True, timeout=60,
                          env={**environ, **extra})


def test_the_entrypoint_reads_secret_references_into_what_it_execs_and_never_logs_a_value(secret_store):
    """Each reference is read with the container's credentials in its ARN's region, before the exec."""
    server, environ = secret_store
    result = run_with(environ, "sh", "-c", 'echo "$HF_TOKEN|$MLFLOW_TRACKING_PASSWORD"',
                      HF_TOKEN_SECRET_ARN=HF_ARN, MLFLOW_TRACKING_PASSWORD_SECRET_ARN=MLFLOW_ARN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hf_secret_value|mlflow-secret-password"
    assert "llm-twin: HF_TOKEN read from HF_TOKEN_SECRET_ARN (Secrets Manager secret)" in result.stderr
    assert "MLFLOW_TRACKING_PASSWORD read from MLFLOW_TRACKING_PASSWORD_SECRET_ARN (SSM parameter)" in result.stderr
    assert "hf_secret_value" not in result.stderr and "mlflow-secret-password" not in result.stderr
    assert server.asked == [("secretsmanager.GetSecretValue", {"SecretId": HF_ARN}, "us-east-1"),
                            ("AmazonSSM.GetParameter", {"Name": MLFLOW_ARN, "WithDecryption": True}, "eu-west-1")]


def test_train_and_serve_are_execd_with_the_secrets_in_their_environment(secret_store, monkeypatch, tmp_path):
    import signal

    from container import entrypoint

    _, environ = secret_store
    aws = [name for name in os.environ if name.startswith("AWS_")]  # a profile of this shell, say
    for name in ("HF_TOKEN", *entrypoint.SCRATCH_VARIABLES, *aws):  # restored after the test: main sets some
        monkeypatch.delenv(name, raising=False)
    for name, value in {**environ, "HF_TOKEN_SECRET_ARN": HF_ARN, "SAGEMAKER_BASE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    seen = {}

    def execv(path, argv):
        seen[argv[2]] = os.environ.get("HF_TOKEN")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise SystemExit(0)

    monkeypatch.setattr(entrypoint.os, "execv", execv)
    monkeypatch.setattr(entrypoint, "use_cuda_compat", lambda verb: None)
    previous = signal.getsignal(signal.SIGTERM)  # main may install its own handler
    try:
        for verb in ("train", "serve"):
            monkeypatch.delenv("HF_TOKEN", raising=False)
            with pytest.raises(SystemExit):
                entrypoint.main([verb])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == {"train": "hf_secret_value", "serve": "hf_secret_value"}


def test_a_secret_the_role_cannot_read_stops_train_and_serve_with_one_clear_line(secret_store, tmp_path):
    _, environ = secret_store
    message = ("cannot read HF_TOKEN_SECRET_ARN's Secrets Manager secret (AccessDeniedException): the role needs "
               "secretsmanager:GetSecretValue on it")
    environ = {**environ, "HF_TOKEN_SECRET_ARN": DENIED_ARN, "SAGEMAKER_BASE_DIR": str(tmp_path)}
    trained = run_with(environ, "train")
    assert trained.returncode == 1 and f"llm-twin: {message}" in trained.stderr
    assert (tmp_path / "output" / "failure").read_text().startswith(message)  # DescribeTrainingJob's FailureReason
    served = run_with(environ, "serve")
    assert served.returncode == 1 and f"llm-twin: {message}" in served.stderr
    looked = run_with(environ, "sh", "-c", 'echo "[$HF_TOKEN]"')  # a debugging command still runs, warned
    assert looked.returncode == 0 and looked.stdout.strip() == "[]" and message in looked.stderr
