#!/usr/bin/env bash
# Train with the image on local_test/test_dir, as SageMaker would: docker run IMAGE train.
#   ./train_local.sh [IMAGE]      (default image: llm-twin-sagemaker:latest)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-llm-twin-sagemaker:latest}"
rm -rf "$here/test_dir/model" "$here/test_dir/output" "$here/test_dir/input/scratch"
mkdir -p "$here/test_dir/model" "$here/test_dir/output"
gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi
docker run --rm "${gpus[@]}" -v "$here/test_dir:/opt/ml" "$image" train
