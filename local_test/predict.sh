#!/usr/bin/env bash
# Send a payload to a local endpoint (Docker or not).
#   ./predict.sh [PAYLOAD] [CONTENT_TYPE]    e.g. ./predict.sh payloads/chat_request.json
#   PORT=8081 ./predict.sh payloads/batch.jsonl application/jsonlines
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
payload="${1:-$here/payloads/llm_twin_request.json}"
content_type="${2:-application/json}"
curl -sS --no-buffer -H "Content-Type: $content_type" --data-binary "@$payload" "http://127.0.0.1:${PORT:-8080}/invocations"
echo
