import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(*args, env=None):
    return subprocess.run([str(BIN / "llm-twin"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_unknown_verb_suggests_the_nearest():
    result = run("trian")
    assert result.returncode != 0
    assert "unknown verb 'trian': did you mean 'train'?" in result.stderr


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



def test_the_entrypoint_holds_sigterm_across_the_exec_into_train_only(monkeypatch):
    """In a container PID 1 ignores a signal it has no handler for, and SageMaker's SIGKILL follows: so
    SIGTERM is blocked (held, not lost) from the entrypoint until train's handler exists."""
    import signal

    from container import entrypoint

    masks = {}

    def execv(path, argv):
        masks[argv[2]] = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        raise SystemExit(0)

    monkeypatch.setattr(entrypoint.os, "execv", execv)
    monkeypatch.setattr(entrypoint, "use_cuda_compat", lambda verb: None)
    for verb in ("train", "serve"):
        try:
            entrypoint.main([verb])
        except SystemExit:
            pass
    assert masks == {"train": True, "serve": False}  # gunicorn must get its SIGTERM


def test_a_sigterm_held_across_the_exec_is_taken_by_trains_handler(tmp_path):
    """What the entrypoint hands over: SIGTERM blocked and already pending. train takes it: exit 143, failure file."""
    held = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
            "os.kill(os.getpid(), signal.SIGTERM); os.execv(sys.executable, [sys.executable, '-m', 'train'])")
    result = subprocess.run([sys.executable, "-c", held], env={**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stdout + result.stderr
    assert (tmp_path / "output" / "failure").read_text().startswith(
        "training stopped by SIGTERM while reading the configuration")
