#!/usr/bin/env bash
# `make demo`: the whole path on this machine, no Docker, twice. First from instruction rows: trains the
# embedded SmolLM2 on local_test/test_dir (a short LoRA SFT), serves the result with the real `serve`, sends
# the request the LLM Twin client sends and prints the answer. Then from raw writing: local_test/documents (a
# person's posts and articles, HTML and Markdown) with instructions=auto, which cleans them, writes the
# instruction each passage answers with vLLM in the job, trains on them, and serves and asks that twin too.
# `train` and `serve` must be on PATH.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${PORT:-8080}"
server=""
documents_job="$(mktemp -d)"
trap 'if [[ -n "$server" ]]; then kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; fi
      rm -rf "$documents_job"' EXIT

serve_and_ask() {  # $1: the SAGEMAKER_BASE_DIR whose model to serve
  echo "== serve $1/model on port $port"
  SAGEMAKER_BASE_DIR="$1" SAGEMAKER_BIND_TO_PORT="$port" serve &
  server=$!
  for _ in $(seq 1 180); do
    if [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" == 200 ]]; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "serve exited" >&2; exit 1; }
    sleep 1
  done
  echo "== POST /invocations ($here/payloads/llm_twin_request.json)"
  curl -sS --fail-with-body -H "Content-Type: application/json" \
    --data-binary "@$here/payloads/llm_twin_request.json" "http://127.0.0.1:$port/invocations" \
    | python3 -c 'import json, sys; print("\n" + json.load(sys.stdin)[0]["generated_text"].strip() + "\n")'
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=""
}

rows_job="$here/test_dir"
rm -rf "$rows_job/model" "$rows_job/output" "$rows_job/checkpoints"
echo "== 1. train from instruction rows (SAGEMAKER_BASE_DIR=$rows_job)"
SAGEMAKER_BASE_DIR="$rows_job" train
serve_and_ask "$rows_job"

echo "== 2. train from raw writing: $here/documents (instructions=auto, SAGEMAKER_BASE_DIR=$documents_job)"
mkdir -p "$documents_job/input/config" "$documents_job/input/data"
cp -r "$here/documents" "$documents_job/input/data/documents"
cat > "$documents_job/input/config/hyperparameters.json" <<'EOF'
{"instructions": "auto", "max_steps": "15", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
 "max_length": "512", "passage_max_tokens": "256", "learning_rate": "3e-4", "warmup_steps": "2",
 "max_new_tokens": "150", "validation_split": "0.15"}
EOF
SAGEMAKER_BASE_DIR="$documents_job" train
echo "== the first instructions it wrote ($documents_job/output/data/instructions.jsonl)"
python3 - "$documents_job/output/data/instructions.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
for row in rows[:3]:
    passage = " ".join(row["output"].split())[:100]
    print(f"- {row['source']} #{row['passage']}: {row['instruction']}\n    -> {passage}...")
print(f"({len(rows)} rows)")
EOF
serve_and_ask "$documents_job"
