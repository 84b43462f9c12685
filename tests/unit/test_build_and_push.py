"""build_and_push.sh with fake `aws` and `docker` on PATH: the commands it runs, per partition."""

import shutil
import subprocess

import pytest

from tests.helpers import REPO

FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$CALLS"
case "$*" in
  "sts get-caller-identity --query Account --output text") echo 123456789012 ;;
  ecr\\ describe-repositories*) [ -n "$REPO_EXISTS" ] || exit 254 ;;
  ecr\\ get-login-password*) echo fake-password ;;
  login*) cat > /dev/null ;;
esac
"""


@pytest.fixture
def fake_cli(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("aws", "docker"):
        (bin_dir / name).write_text(FAKE)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "HOME": str(tmp_path)}
    return env, calls


@pytest.mark.parametrize("region,domain", [("us-east-1", "amazonaws.com"), ("cn-north-1", "amazonaws.com.cn"),
                                           ("us-gov-west-1", "amazonaws.com")])
def test_builds_tags_and_pushes_to_the_partitions_registry(fake_cli, region, domain):
    env, calls = fake_cli
    result = subprocess.run([str(REPO / "build_and_push.sh"), "--region", region, "twin", "v7"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    registry = f"123456789012.dkr.ecr.{region}.{domain}"
    lines = calls.read_text().splitlines()
    assert lines[:3] == [
        "aws sts get-caller-identity --query Account --output text",
        f"aws ecr describe-repositories --region {region} --repository-names twin",
        f"aws ecr create-repository --region {region} --repository-name twin "
        "--image-scanning-configuration scanOnPush=true",
    ]
    assert set(lines[3:5]) == {f"aws ecr get-login-password --region {region}",  # one pipeline: either order
                               f"docker login --username AWS --password-stdin {registry}"}
    assert lines[5:] == [
        # no attestation index
        f"docker build --platform linux/amd64 --provenance=false --sbom=false -t twin:v7 {REPO}",
        f"docker tag twin:v7 {registry}/twin:v7",
        f"docker push {registry}/twin:v7",
    ]
    assert f"pushed {registry}/twin:v7" in result.stdout


def test_existing_repository_and_region_from_the_environment(fake_cli):
    env, calls = fake_cli
    result = subprocess.run([str(REPO / "build_and_push.sh")],
                            env={**env, "REPO_EXISTS": "1", "AWS_REGION": "eu-west-1"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    log = calls.read_text()
    assert "create-repository" not in log and "dkr.ecr.eu-west-1.amazonaws.com/llm-twin-sagemaker:" in log


def test_dry_run_runs_nothing_and_a_missing_region_is_an_error(fake_cli):
    env, calls = fake_cli
    result = subprocess.run([str(REPO / "build_and_push.sh"), "--dry-run", "--region", "us-east-1"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "+ docker push" in result.stdout and not calls.exists()
    missing = subprocess.run([str(REPO / "build_and_push.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no AWS region" in missing.stderr


def test_the_default_tag_is_the_commit_and_says_dirty_when_the_tree_has_changes(fake_cli, tmp_path):
    env, calls = fake_cli
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "build_and_push.sh", repo)

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                              env=env).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "one")
    commit = git("rev-parse", "--short", "HEAD")
    for change, tag in ((None, commit), ("new.txt", f"{commit}-dirty")):
        if change:
            (repo / change).write_text("not committed")
        calls.write_text("")
        result = subprocess.run([str(repo / "build_and_push.sh"), "--region", "us-east-1", "twin"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"docker push 123456789012.dkr.ecr.us-east-1.amazonaws.com/twin:{tag}" in calls.read_text()
