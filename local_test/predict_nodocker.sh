#!/usr/bin/env bash
# Send a payload to the endpoint serve_local_nodocker.sh started: the same request as predict.sh.
exec "$(dirname "$0")/predict.sh" "$@"
