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


PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\nGCC version: gcc 7\n"
OPEN_MODULE = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  575.57.08  Release Build  (dvs-builder)\n"


def fake_gpu_host(tmp_path, driver_line, compat_libs=("libcuda.so.1", "libcuda.so.570.124.06", "libnvidia-ptxjitcompiler.so.570.124.06")):
    version_file = tmp_path / "version"
    version_file.write_text(driver_line)
    compat = tmp_path / "compat"
    compat.mkdir()
    for name in compat_libs:
        (compat / name).write_bytes(b"")
    return {"LLM_TWIN_NVIDIA_VERSION_FILE": str(version_file), "LLM_TWIN_CUDA_COMPAT_DIR": str(compat)}


def test_an_old_host_driver_gets_the_cuda_compat_libraries_first(tmp_path):
    env = fake_gpu_host(tmp_path, PROPRIETARY)
    result = run("sh", "-c", 'echo "$LD_LIBRARY_PATH"', env={**env, "LD_LIBRARY_PATH": "/opt/other"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'compat'}:/opt/other"
    assert "host NVIDIA driver 470.256.2 is older than this image's CUDA (driver 570.124.6)" in result.stderr


def test_a_new_enough_driver_or_no_gpu_leaves_the_library_path_alone(tmp_path):
    newer = fake_gpu_host(tmp_path, OPEN_MODULE)
    no_gpu = {**newer, "LLM_TWIN_NVIDIA_VERSION_FILE": str(tmp_path / "absent")}
    for env in (newer, no_gpu):
        result = run("sh", "-c", 'echo "[$LD_LIBRARY_PATH]"', env={**env, "LD_LIBRARY_PATH": ""})
        assert result.returncode == 0 and result.stdout.strip() == "[]" and result.stderr == ""


def test_driver_versions_are_read_from_both_kernel_module_flavours(tmp_path):
    from container import cuda_compat

    (tmp_path / "v").write_text(OPEN_MODULE)
    assert cuda_compat.host_driver_version(tmp_path / "v") == (575, 57, 8)
    (tmp_path / "v").write_text(PROPRIETARY)
    assert cuda_compat.host_driver_version(tmp_path / "v") == (470, 256, 2)
    (tmp_path / "v").write_text("garbage")
    assert cuda_compat.host_driver_version(tmp_path / "v") is None
    assert cuda_compat.compat_driver_version(tmp_path / "no-such-dir") is None
