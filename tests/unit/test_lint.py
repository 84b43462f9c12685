"""The Python code, the Dockerfile and the shell scripts lint clean, and the Dockerfile keeps SageMaker's
must-haves."""

import subprocess

from tests.helpers import BIN, REPO

SHELL_SCRIPTS = [REPO / "build_and_push.sh", REPO / ".ci" / "run", *sorted((REPO / "local_test").glob("*.sh")),
                 *sorted((REPO / "scripts").glob("*.sh"))]


def test_ruff_finds_nothing():
    """Lines of at most 120 characters, no unused names, sorted imports (pyproject.toml's [tool.ruff])."""
    result = subprocess.run([str(BIN / "ruff"), "check", "--output-format", "concise", str(REPO)], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_hadolint_dockerfile():
    result = subprocess.run([str(BIN / "hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_scripts():
    result = subprocess.run([str(BIN / "shellcheck"), *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_the_sagemaker_must_haves():
    text = (REPO / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["llm-twin"]' in text  # exec form: PID 1 gets SIGTERM
    assert "LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in text
    assert "/opt/ml" not in text  # reserved for SageMaker
    assert '-r requirements.txt -r "requirements-${ENGINE}.txt" -c "requirements-${ENGINE}.lock"' in text


def test_build_and_push_dry_run_prints_the_commands(tmp_path):
    result = subprocess.run([str(REPO / "build_and_push.sh"), "--dry-run", "--region", "us-gov-west-1", "twin", "v1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "docker build --platform linux/amd64 --provenance=false --sbom=false -t twin:v1" in result.stdout
    assert "dkr.ecr.us-gov-west-1.amazonaws.com/twin:v1" in result.stdout


def test_dockerfile_bases_are_pinned_and_args_do_not_shadow_deepspeed():
    args = dict(line.removeprefix("ARG ").split("=", 1) for line in (REPO / "Dockerfile").read_text().splitlines()
                if line.startswith("ARG ") and "=" in line)
    assert "@sha256:" in args["BUILD_BASE"] and "@sha256:" in args["RUNTIME_BASE"]
    # An ARG is in the environment of every RUN after it; DeepSpeed's setup.py reads DS_BUILD_* itself.
    assert not [name for name in args if name.startswith("DS_")]
