#!/usr/bin/env bash
# `make demo`: the whole path on this machine, no Docker. Trains the embedded SmolLM2 on
# local_test/test_dir (a short LoRA SFT), serves the result with the real `serve`, sends the request
# the LLM Twin client sends, prints the answer and stops the server. `train` and `serve` must be on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export SAGEMAKER_BASE_DIR="$here/test_dir"
port="${PORT:-8080}"

rm -rf "$SAGEMAKER_BASE_DIR/model" "$SAGEMAKER_BASE_DIR/output"
echo "== train (SAGEMAKER_BASE_DIR=$SAGEMAKER_BASE_DIR)"
train

echo "== serve on port $port"
SAGEMAKER_BIND_TO_PORT="$port" serve &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" == 200 ]]; then break; fi
  kill -0 "$server" 2>/dev/null || { echo "serve exited" >&2; exit 1; }
  sleep 1
done

echo "== POST /invocations ($here/payloads/llm_twin_request.json)"
curl -sS --fail-with-body -H "Content-Type: application/json" \
  --data-binary "@$here/payloads/llm_twin_request.json" "http://127.0.0.1:$port/invocations" \
  | python3 -c 'import json, sys; print("\n" + json.load(sys.stdin)[0]["generated_text"].strip() + "\n")'
