#!/usr/bin/env bash
# make sdk-local-test: the SageMaker SDK's own local modes run the image `make image-test` built.
#
#   1. SDK v3 `ModelTrainer(training_mode=Mode.LOCAL_CONTAINER)` trains it (2 LoRA steps on the embedded
#      model) and packs model.tar.gz, exactly as it would before a real CreateTrainingJob;
#   2. SDK v2 `Model(image_uri=..., model_data="file://.../model.tar.gz").deploy(instance_type="local")`
#      serves that tarball and `predict` gets TGI's answer through the SDK's local runtime client;
#   3. SDK v2 `HuggingFaceModel(image_uri=..., env={"HF_MODEL_ID": ...})` with no model data, as the LLM
#      Twin book deploys, answers the book's payload.
#
# The SDKs start containers with `docker compose` (or `docker-compose`): here `docker` is a small script
# that hands everything to podman (with image-test's storage and wrapped runc), answering only `docker
# context inspect` itself in Docker's shape, and `docker-compose` is podman-compose from PyPI. The serving
# container gets a 1 GiB /dev/shm through the SDK's own `local.container_config` (vLLM needs about 400 MiB).
# The SDKs' telemetry calls fail offline and log tracebacks: harmless.
#
# Needs root and the image from `make image-test` (same IMAGE_TEST_DIR). The v3 SDK gets its own venv
# in IMAGE_TEST_DIR (v2 and v3 are one distribution); v2 is the dev venv's. About 3 minutes.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${IMAGE_TEST_DIR:-/tmp/llm-twin-image-test}"
image=localhost/llm-twin:image-test
started=$SECONDS
step() { echo "== [$((SECONDS - started)) s] $*"; }

if [[ $EUID -ne 0 ]]; then echo "sdk-local-test needs root (podman storage)" >&2; exit 2; fi
[[ -x "$work/runc-without-rlimits" ]] || { echo "run make image-test first: it builds the image this test runs" >&2; exit 2; }
real_podman="$(command -v podman)"
driver="${STORAGE_DRIVER:-overlay}"
if ! podman --root "$work/storage" --runroot "$work/run" --storage-driver "$driver" info >/dev/null 2>&1; then driver=vfs; fi
podman --root "$work/storage" --runroot "$work/run" --storage-driver "$driver" image exists "$image" \
  || { echo "no $image in $work: run make image-test first" >&2; exit 2; }

step "the SageMaker SDK v3 (sagemaker==3.27.0) and podman-compose 1.6.0 in $work/sdk-v3"
sdk_v3=("sagemaker==3.27.0" "podman-compose==1.6.0" "pyyaml==6.0.4")
if [[ "$(cat "$work/sdk-v3/.installed" 2>/dev/null)" != "${sdk_v3[*]}" ]]; then
  rm -rf "$work/sdk-v3" && python3 -m venv "$work/sdk-v3"
  "$work/sdk-v3/bin/pip" install --quiet --disable-pip-version-check "${sdk_v3[@]}"
  echo "${sdk_v3[*]}" > "$work/sdk-v3/.installed"
fi

bin="$work/sdk-bin"
mkdir -p "$bin"
cat > "$bin/podman" <<EOF
#!/usr/bin/env bash
export CONTAINERS_CONF="$work/containers.conf"
exec "$real_podman" --root "$work/storage" --runroot "$work/run" --storage-driver "$driver" "\$@"
EOF
cat > "$bin/docker" <<EOF
#!/usr/bin/env bash
if [[ "\${1:-} \${2:-}" == "context inspect" ]]; then
  echo '[{"Name":"default","Endpoints":{"docker":{"Host":"unix:///var/run/docker.sock"}}}]'
  exit 0
fi
exec "$bin/podman" "\$@"
EOF
cat > "$bin/docker-compose" <<EOF
#!/usr/bin/env bash
exec "$work/sdk-v3/bin/podman-compose" "\$@"
EOF
chmod +x "$bin/podman" "$bin/docker" "$bin/docker-compose"
export PATH="$bin:$PATH" AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1
# SageMaker local serving listens on the host's 8080. A run that failed half-way may have left its
# containers (this storage holds only this test's): remove them before and after.
remove_containers() { "$bin/podman" rm -f --all >/dev/null 2>&1 || true; }
remove_containers
trap remove_containers EXIT
if curl -s -o /dev/null "http://127.0.0.1:8080/"; then echo "port 8080 is in use: SDK local serving needs it" >&2; exit 1; fi

jobdir="$work/sdk-local"
rm -rf "$jobdir" && mkdir -p "$jobdir"
step "the image declares SageMaker's capabilities (labels)"
for capability in accept-bind-to-port bidirectional-streaming; do
  label="$("$bin/podman" image inspect --format "{{index .Config.Labels \"com.amazonaws.sagemaker.capabilities.$capability\"}}" "$image")"
  echo "com.amazonaws.sagemaker.capabilities.$capability=$label"
  [[ "$label" == "true" ]] || { echo "the image lacks the $capability label" >&2; exit 1; }
done
step "SDK v3 ModelTrainer, training_mode=LOCAL_CONTAINER"
"$work/sdk-v3/bin/python" "$repo/local_test/sdk_local_mode.py" train "$image" "$jobdir"
step "SDK v2 Model.deploy(instance_type='local') and predict"
"$repo/.venv/bin/python" "$repo/local_test/sdk_local_mode.py" deploy "$image" "$jobdir"
remove_containers  # delete_endpoint stops the SDK's compose process, not always its container (port 8080)
step "SDK v2 HuggingFaceModel with HF_MODEL_ID and no model data (the LLM Twin book's deployment)"
"$repo/.venv/bin/python" "$repo/local_test/sdk_local_mode.py" book "$image" "$jobdir"
step "sdk-local-test passed"
