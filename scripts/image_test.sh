#!/usr/bin/env bash
# make image-test: build the image from this Dockerfile without a Docker daemon or a registry, then run
# the image's own `train` and `serve` inside its filesystem against a copy of local_test/test_dir.
#
#   1. debootstrap Debian 12 (Python 3.11) and `podman import` it as the base image;
#   2. `podman build --isolation chroot` with CPU build arguments, torch from this machine's CPU wheel;
#   3. mount the image, chroot into it with the image's own environment, run `llm-twin train`, then
#      `llm-twin serve`, and ask /ping and /invocations over loopback.
# Needs root, debootstrap and podman (apt-get install debootstrap podman). Takes several minutes.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${IMAGE_TEST_DIR:-/tmp/llm-twin-image-test}"
wheel="${TORCH_WHEEL:-$(find /opt/wheels -name 'torch-2.13.0+cpu-cp311-*.whl' 2>/dev/null | head -1)}"
port="${PORT:-8093}"
podman=(podman --root "$work/storage" --runroot "$work/run" --storage-driver vfs)
mkdir -p "$work"

if ! "${podman[@]}" image exists localhost/debbase:bookworm; then
  [[ -d "$work/rootfs/usr" ]] || debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$work/rootfs" http://deb.debian.org/debian
  tar -C "$work/rootfs" -c . | "${podman[@]}" import - localhost/debbase:bookworm
fi

# The build context: the repository's tracked files and the CPU torch wheel.
context="$work/context"
rm -rf "$context" && mkdir -p "$context/.wheels"
git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 cp --parents -t "$context")
cp "$wheel" "$context/.wheels/"
secret=()
ca=/etc/ssl/certs/ca-certificates.crt  # this machine's proxy CA, for pip inside the build only
if [[ -f "$ca" ]]; then secret=(--secret "id=pipca,src=$ca"); fi
"${podman[@]}" build --isolation chroot "${secret[@]}" -t localhost/llm-twin:image-test \
  --build-arg BUILD_BASE=localhost/debbase:bookworm --build-arg RUNTIME_BASE=localhost/debbase:bookworm \
  --build-arg "TORCH_PIP_ARGS=--find-links /context/.wheels" \
  --build-arg "DS_BUILD_OPS=DS_BUILD_CPU_ADAM=1" "$context"

# Run the image's own entrypoint inside its filesystem, with the image's environment.
container="$("${podman[@]}" create localhost/llm-twin:image-test)"
root="$("${podman[@]}" mount "$container")"
cleanup() {
  [[ -n "${server:-}" ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  umount "$root/proc" "$root/dev" 2>/dev/null || true
  "${podman[@]}" umount "$container" >/dev/null || true
  "${podman[@]}" rm "$container" >/dev/null || true
}
trap cleanup EXIT
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
mapfile -t image_env < <("${podman[@]}" inspect --format '{{range .Config.Env}}{{println .}}{{end}}' localhost/llm-twin:image-test | grep .)
rm -rf "$root/opt/ml" && mkdir -p "$root/opt/ml"
cp -r "$repo/local_test/test_dir/input" "$root/opt/ml/"
printf '{"max_steps": "2", "per_device_train_batch_size": "2", "max_length": "128", "validation_split": "0"}\n' \
  > "$root/opt/ml/input/config/hyperparameters.json"
run_in_image() { chroot "$root" /usr/bin/env -i "${image_env[@]}" HOME=/root "$@"; }

echo "== train (inside the image)"
run_in_image llm-twin train
ls "$root/opt/ml/model"
echo "== serve (inside the image) on port $port"
run_in_image env SAGEMAKER_BIND_TO_PORT="$port" llm-twin serve &
server=$!
for _ in $(seq 1 180); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" == 200 ]] && break
  sleep 1
done
curl -sS --fail-with-body "http://127.0.0.1:$port/ping" && echo "ping: 200"
curl -sS --fail-with-body -H "Content-Type: application/json" \
  --data-binary "@$repo/local_test/payloads/llm_twin_request.json" "http://127.0.0.1:$port/invocations"
echo
echo "image-test passed"
