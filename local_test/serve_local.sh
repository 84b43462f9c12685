#!/usr/bin/env bash
# Serve local_test/test_dir/model with the image on port 8080, as SageMaker would: docker run IMAGE serve.
#   ./serve_local.sh [IMAGE]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-llm-twin-sagemaker:latest}"
gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi
docker run --rm ${gpus[@]+"${gpus[@]}"} --shm-size=1g -p 8080:8080 -v "$here/test_dir:/opt/ml" "$image" serve  # vLLM needs /dev/shm
