#!/usr/bin/env bash
# Serve without Docker on port ${PORT:-8080}: the same `serve` entrypoint, on local_test/test_dir/model
# (or on the tree SAGEMAKER_BASE_DIR names).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="$(cd "$here/.." && pwd)/.venv/bin"
SAGEMAKER_BASE_DIR="${SAGEMAKER_BASE_DIR:-$here/test_dir}" SAGEMAKER_BIND_TO_PORT="${PORT:-8080}" exec "$bin/serve"
