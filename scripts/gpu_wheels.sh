#!/usr/bin/env bash
# The wheels `make gpu-check` needs on a GPU machine that has no network but has torch, transformers,
# peft, accelerate and pyarrow (the lent device's image: torch 2.11, transformers 5.17): into .whl/ for
# Python 3.12 on x86-64, about 50 MB (bitsandbytes is 43 of them). vLLM's CUDA wheel is far too large to
# carry, so the check covers training and the model the server would load. On that machine:
#   pip install --no-index --no-deps --no-build-isolation --target /tmp/site .whl/* && PYTHONPATH=/tmp/site make gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements-cpu.lock | head -1; }  # the version, without its hashes
wheels=(
  "trl==$(pin trl)" "datasets==$(pin datasets)" "dill==$(pin dill)" "multiprocess==$(pin multiprocess)"
  "bitsandbytes==$(pin bitsandbytes)" "hjson==$(pin hjson)" "pydantic==$(pin pydantic)"
  "pydantic_core==$(pin pydantic_core)" "annotated-types==$(pin annotated-types)"
  "typing-inspection==$(pin typing-inspection)"
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${wheels[@]}"
# DeepSpeed is an sdist only: it is built there (no ops prebuilt; they compile on first use).
python3 -m pip download --quiet --no-deps --no-binary=:all: -d .whl "deepspeed==$(pin deepspeed)"
du -sh .whl
