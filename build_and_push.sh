#!/usr/bin/env bash
# Build the image and push it to Amazon ECR.
#
#   ./build_and_push.sh [--dry-run] [--region REGION] [IMAGE_NAME] [TAG]
#
# IMAGE_NAME defaults to llm-twin-sagemaker, TAG to the current git commit (with -dirty when the tree has
# uncommitted changes: such a tag is not that commit's build). The region comes from
# --region, then AWS_REGION / AWS_DEFAULT_REGION, then `aws configure get region`. The account comes
# from STS. The ECR repository is created (scan on push) if it does not exist. --dry-run prints every
# command instead of running it.
set -euo pipefail

dry_run=false
region=""
positional=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=true; shift ;;
    --region) region="${2:?--region needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "build_and_push.sh: unknown option $1 (expected --dry-run, --region)" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done

image="${positional[0]:-llm-twin-sagemaker}"
here="$(dirname "$0")"
commit="$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo latest)"
if [[ "$commit" != latest && -n "$(git -C "$here" status --porcelain 2>/dev/null)" ]]; then
  commit="$commit-dirty"
fi
tag="${positional[1]:-$commit}"
if ! $dry_run; then
  for tool in aws docker; do
    command -v "$tool" >/dev/null || { echo "build_and_push.sh: needs $tool on PATH" >&2; exit 2; }
  done
fi
region="${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region 2>/dev/null || true)}}}"
if [[ -z "$region" ]]; then
  echo "build_and_push.sh: no AWS region: pass --region, set AWS_REGION, or run 'aws configure'" >&2
  exit 2
fi

run() {
  if $dry_run; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

case "$region" in
  cn-*) domain="amazonaws.com.cn" ;;
  *) domain="amazonaws.com" ;;
esac

if $dry_run; then
  account="<account>"
  echo "+ aws sts get-caller-identity --query Account --output text"
else
  account="$(aws sts get-caller-identity --query Account --output text)"
fi
registry="${account}.dkr.ecr.${region}.${domain}"
uri="${registry}/${image}:${tag}"

if $dry_run || ! aws ecr describe-repositories --region "$region" --repository-names "$image" >/dev/null 2>&1; then
  run aws ecr create-repository --region "$region" --repository-name "$image" \
    --image-scanning-configuration scanOnPush=true
fi

if $dry_run; then
  echo "+ aws ecr get-login-password --region $region | docker login --username AWS --password-stdin $registry"
else
  aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"
fi

# One linux/amd64 image manifest: SageMaker's CreateModel and CreateTrainingJob refuse an OCI image index,
# which BuildKit makes when it attaches provenance or SBOM attestations ("Unsupported manifest media type").
run docker build --platform linux/amd64 --provenance=false --sbom=false -t "${image}:${tag}" "$(dirname "$0")"
run docker tag "${image}:${tag}" "$uri"
run docker push "$uri"
if $dry_run; then echo "would push $uri"; else echo "pushed $uri"; fi
