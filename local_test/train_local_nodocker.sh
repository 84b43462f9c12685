#!/usr/bin/env bash
# Train without Docker: the same `train` entrypoint as a plain process, on local_test/test_dir
# (or on the tree SAGEMAKER_BASE_DIR names).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$here/.." && pwd)/.venv/bin"
root="${SAGEMAKER_BASE_DIR:-$here/test_dir}"
rm -rf "$root/model" "$root/output" "$root/checkpoints"  # a fresh run: nothing of the last one to resume from
SAGEMAKER_BASE_DIR="$root" "$bin/train"
