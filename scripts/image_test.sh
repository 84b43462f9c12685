#!/usr/bin/env bash
# make image-test: build the image from this Dockerfile without a Docker daemon or a registry, then run the
# image's own `train` and `serve` inside its filesystem against a copy of local_test/test_dir.
#
#   1. debootstrap Debian 12 (Python 3.11) and `podman import` it as the base of every stage;
#   2. `podman build --isolation chroot` with the CPU build arguments; torch is a wheel put in the context;
#   3. mount the image and chroot into it with the image's ENTRYPOINT, WORKDIR and ENV (`podman run` does
#      not work here): `train` must publish a model, `serve` must answer /ping and /invocations.
#
# Needs root; installs podman and debootstrap with apt-get when they are missing. About 6 minutes on 2
# cores the first time; the base image and the layer cache stay in IMAGE_TEST_DIR for the next run.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${IMAGE_TEST_DIR:-/tmp/llm-twin-image-test}"
port="${PORT:-8093}"
image=localhost/llm-twin:image-test
podman=(podman --root "$work/storage" --runroot "$work/run")
started=$SECONDS
step() { echo "== [$((SECONDS - started)) s] $*"; }

if [[ $EUID -ne 0 ]]; then echo "image-test needs root (debootstrap, podman storage, chroot)" >&2; exit 2; fi
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v curl >/dev/null; then
  step "installing podman, debootstrap and curl"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap curl >/dev/null
fi
mkdir -p "$work"
# overlay stores each layer as a diff. vfs, where the kernel has no overlay, copies whole layers at every
# step: it needs tens of GB.
driver="${STORAGE_DRIVER:-overlay}"
if ! "${podman[@]}" --storage-driver "$driver" info >/dev/null 2>&1; then driver=vfs; fi
podman+=(--storage-driver "$driver")
step "podman storage: $driver in $work"

step "base image: Debian 12 from debootstrap"
if ! "${podman[@]}" image exists localhost/debbase:bookworm; then
  [[ -d "$work/rootfs/usr" ]] || debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" http://deb.debian.org/debian
  tar -C "$work/rootfs" -c . | "${podman[@]}" import - localhost/debbase:bookworm
fi

# The build context: the repository's tracked files, plus a torch wheel of the pinned version for the
# image's Python 3.11: TORCH_WHEEL, else a CPU wheel in pip's find-links folders (this machine keeps one in
# /opt/wheels), else whatever the host's pip downloads (PyPI's CUDA build: it works, several GB slower).
context="$work/context"
rm -rf "$context" && mkdir -p "$context/.wheels"
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$context")
torch_version="$(sed -n 's/^torch==//p' "$repo/requirements.txt")"
wheel="${TORCH_WHEEL:-}"
for folder in ${PIP_FIND_LINKS:-} /opt/wheels; do
  [[ -n "$wheel" ]] || wheel="$(find "$folder" -maxdepth 1 -name "torch-$torch_version+cpu-cp311-*.whl" 2>/dev/null | head -1)"
done
if [[ -n "$wheel" ]]; then
  cp "$wheel" "$context/.wheels/"
else
  step "no local CPU wheel of torch $torch_version: downloading one with the host's pip"
  python3 -m pip download --quiet --no-deps --only-binary :all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -d "$context/.wheels" "torch==$torch_version"
fi
# A TLS-intercepting proxy's CA (this machine has one) reaches pip as a build secret, never a layer.
secret=()
ca=/etc/ssl/certs/ca-certificates.crt
if [[ -f "$ca" ]]; then secret=(--secret "id=pipca,src=$ca"); fi

step "podman build (CPU build arguments)"
"${podman[@]}" build --isolation chroot "${secret[@]}" -t "$image" \
  --build-arg BUILD_BASE=localhost/debbase:bookworm --build-arg RUNTIME_BASE=localhost/debbase:bookworm \
  --build-arg "TORCH_PIP_ARGS=--find-links /context/.wheels" --build-arg "DEEPSPEED_OPS=DS_BUILD_CPU_ADAM=1" \
  --build-arg ENGINE=cpu "$context"

container="$("${podman[@]}" create "$image")"
root="$("${podman[@]}" mount "$container")"
server=""
cleanup() {  # serve runs in its own process group: stop all of it (gunicorn's master and workers)
  if [[ -n "$server" ]]; then kill -TERM -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  umount "$root/proc" "$root/dev" "$root/sys" 2>/dev/null || true
  "${podman[@]}" umount "$container" >/dev/null || true
  "${podman[@]}" rm "$container" >/dev/null || true
}
trap cleanup EXIT
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /sys "$root/sys"  # as docker run mounts it: vLLM's CPU engine reads the CPU topology (lscpu)

# What `docker run IMAGE ARGS` would run: the image's ENTRYPOINT, in its WORKDIR, with only its ENV.
inspect() { "${podman[@]}" image inspect --format "$1" "$image"; }
mapfile -t entrypoint < <(inspect '{{range .Config.Entrypoint}}{{println .}}{{end}}' | grep .)
mapfile -t image_env < <(inspect '{{range .Config.Env}}{{println .}}{{end}}' | grep .)
workdir="$(inspect '{{.Config.WorkingDir}}')"
in_image=(chroot "$root" /usr/bin/env -i -C "$workdir" "${image_env[@]}" HOME=/root SAGEMAKER_BIND_TO_PORT="$port"
  "${entrypoint[@]}")
label="$(inspect '{{index .Config.Labels "com.amazonaws.sagemaker.capabilities.accept-bind-to-port"}}')"
[[ "$label" == "true" ]] || { echo "the accept-bind-to-port label is missing" >&2; exit 1; }
[[ ! -e "$root/opt/ml" ]] || { echo "the image has files under /opt/ml" >&2; exit 1; }

step "the DeepSpeed op the build asked for is prebuilt"
"${in_image[@]}" python -c "from deepspeed.git_version_info import installed_ops as ops; assert ops['cpu_adam'], ops; print(ops)"

step "train, inside the image, on local_test/test_dir"
mkdir -p "$root/opt/ml"
cp -r "$repo/local_test/test_dir/input" "$root/opt/ml/"
printf '{"max_steps": "2", "per_device_train_batch_size": "2", "max_length": "128", "validation_split": "0"}\n' \
  > "$root/opt/ml/input/config/hyperparameters.json"
"${in_image[@]}" train
ls -l "$root/opt/ml/model"
[[ -f "$root/opt/ml/model/serving.json" ]] || { echo "train did not publish a model" >&2; exit 1; }

step "serve, inside the image, on port $port"
if curl -s -o /dev/null "http://127.0.0.1:$port/"; then echo "port $port is already in use: set PORT" >&2; exit 1; fi
setsid "${in_image[@]}" serve &
server=$!
for _ in $(seq 1 180); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" == 200 ]] && break
  kill -0 "$server" 2>/dev/null || { echo "serve exited before answering /ping" >&2; exit 1; }
  sleep 1
done
curl -sS --fail-with-body "http://127.0.0.1:$port/ping" >/dev/null  # its own statement: set -e stops on failure
echo "GET /ping: 200"
answer="$(curl -sS --fail-with-body -H "Content-Type: application/json" \
  --data-binary "@$repo/local_test/payloads/llm_twin_request.json" "http://127.0.0.1:$port/invocations")"
echo "POST /invocations: $answer"
[[ "$answer" == *generated_text* ]] || { echo "no generated_text in the answer" >&2; exit 1; }

step "SIGTERM stops serve, as SageMaker stops an endpoint"
kill -TERM -- "-$server"
for _ in $(seq 1 60); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
if kill -0 "$server" 2>/dev/null; then echo "serve did not stop within 60 s of SIGTERM" >&2; exit 1; fi
code=0
wait "$server" || code=$?
server=""
[[ $code -eq 0 ]] || { echo "serve exited with $code on SIGTERM (expected 0)" >&2; exit 1; }
if curl -s -o /dev/null "http://127.0.0.1:$port/"; then echo "something still answers on port $port" >&2; exit 1; fi
step "image-test passed"
