#!/usr/bin/env bash
# Train with the image on local_test/test_dir, as SageMaker would: docker run IMAGE train.
#   ./train_local.sh [IMAGE]      (default image: llm-twin-sagemaker:latest)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-llm-twin-sagemaker:latest}"
# A fresh run: no model, output or checkpoints of the last one (which it would resume from). Removed through the
# image, because a rootful Docker leaves them owned by root.
docker run --rm --entrypoint rm -v "$here/test_dir:/opt/ml" "$image" \
  -rf /opt/ml/model /opt/ml/output /opt/ml/checkpoints /opt/ml/input/scratch
mkdir -p "$here/test_dir/model" "$here/test_dir/output"
gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then gpus=(--gpus all); fi
docker run --rm ${gpus[@]+"${gpus[@]}"} -v "$here/test_dir:/opt/ml" "$image" train  # bash 3.2 (macOS): no empty "${a[@]}"
