#!/usr/bin/env bash
# make image-test: build the image from this Dockerfile without a Docker daemon or a registry, then run it
# as `docker run` would against a copy of local_test/test_dir.
#
#   1. debootstrap Debian 12 (Python 3.11) and `podman import` it as the base of every stage;
#   2. `podman build --isolation chroot` with the CPU build arguments; torch is a wheel put in the context;
#   3. `podman run IMAGE train` with the /opt/ml tree mounted must publish a model; `podman run` of serve
#      with docker's default 64 MiB /dev/shm must refuse to start, saying to pass --shm-size; `podman run
#      --shm-size=1g -p PORT:8080 IMAGE serve` with the model mounted read-only must answer /ping and
#      /invocations; `podman stop` (SIGTERM) must end it with exit 0.
#
# podman's default runtime (crun) cannot start containers on this machine (setrlimit is not permitted,
# and it refuses the hybrid cgroup layout): containers run under Debian's runc through a wrapper that
# drops `process.rlimits` from the bundle's config.json, registered in a containers.conf of this test's.
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
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v curl >/dev/null \
   || [[ ! -x /usr/sbin/runc ]]; then
  step "installing podman, runc, debootstrap and curl"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap curl >/dev/null
fi
mkdir -p "$work"
cat > "$work/runc-without-rlimits" <<'WRAPPER'
#!/usr/bin/env python3
import json, os, sys
args = sys.argv[1:]
if "--bundle" in args:
    config = os.path.join(args[args.index("--bundle") + 1], "config.json")
    with open(config) as f:
        spec = json.load(f)
    spec.get("process", {}).pop("rlimits", None)
    with open(config, "w") as f:
        json.dump(spec, f)
os.execv("/usr/sbin/runc", ["runc", *args])
WRAPPER
chmod +x "$work/runc-without-rlimits"
printf '[engine]\nruntime = "runc-without-rlimits"\n[engine.runtimes]\nrunc-without-rlimits = ["%s"]\n' \
  "$work/runc-without-rlimits" > "$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
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
  [[ -z "$wheel" && -d "$folder" ]] || continue  # a missing folder (or a URL) must not end the script: pipefail
  wheel="$(find "$folder" -maxdepth 1 -name "torch-$torch_version+cpu-cp311-*.whl" | head -1)"
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

name=llm-twin-image-test-serve
tree="$work/opt_ml"
cleanup() { "${podman[@]}" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
run=("${podman[@]}" run --rm)

for capability in accept-bind-to-port bidirectional-streaming; do
  label="$("${podman[@]}" image inspect --format "{{index .Config.Labels \"com.amazonaws.sagemaker.capabilities.$capability\"}}" "$image")"
  [[ "$label" == "true" ]] || { echo "the $capability label is missing" >&2; exit 1; }
done
"${run[@]}" "$image" test ! -e /opt/ml || { echo "the image has files under /opt/ml" >&2; exit 1; }

step "the DeepSpeed op the build asked for is prebuilt"
"${run[@]}" "$image" python -c "from deepspeed.git_version_info import installed_ops as ops; assert ops['cpu_adam'], ops; print(ops)"

step "podman run IMAGE train, on local_test/test_dir mounted at /opt/ml, tracked by all three trackers"
rm -rf "$tree" && mkdir -p "$tree"
cp -r "$repo/local_test/test_dir/input" "$tree/"
printf '{"max_steps": "2", "per_device_train_batch_size": "2", "max_length": "128", "validation_split": "0", %s}\n' \
  '"report_to": "tensorboard,mlflow,wandb"' > "$tree/input/config/hyperparameters.json"
"${run[@]}" -v "$tree:/opt/ml" -e MLFLOW_TRACKING_URI=file:///opt/ml/output/mlruns -e MLFLOW_ALLOW_FILE_STORE=true \
  -e WANDB_MODE=offline -e TRAINING_JOB_NAME=image-test "$image" train
ls -l "$tree/model"
[[ -f "$tree/model/serving.json" ]] || { echo "train did not publish a model" >&2; exit 1; }
ls "$tree"/output/tensorboard/sft/events.out.tfevents.* "$tree"/output/data/wandb/offline-run-*/run-*.wandb \
  "$tree"/output/mlruns/*/*/metrics/sft/train/loss "$tree"/output/mlruns/*/*/artifacts/README.md \
  || { echo "a tracker wrote nothing" >&2; exit 1; }

step "serve with docker run's 64 MiB /dev/shm: refused at once, naming the fix (vLLM needs about 400 MiB there)"
if refusal="$("${run[@]}" -v "$tree/model:/opt/ml/model:ro" "$image" serve 2>&1)"; then
  echo "serve started with a 64 MiB /dev/shm" >&2; exit 1
fi
echo "$refusal" | tail -1
[[ "$refusal" == *"--shm-size=1g"* ]] || { echo "serve did not name --shm-size" >&2; exit 1; }

step "podman run --shm-size=1g -p $port:8080 IMAGE serve, the model mounted read-only"
if curl -s -o /dev/null "http://127.0.0.1:$port/"; then echo "port $port is already in use: set PORT" >&2; exit 1; fi
"${podman[@]}" run -d --name "$name" --shm-size=1g -p "127.0.0.1:$port:8080" -v "$tree/model:/opt/ml/model:ro" \
  "$image" serve >/dev/null
for _ in $(seq 1 180); do
  [[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ping")" == 200 ]] && break
  [[ "$("${podman[@]}" inspect --format '{{.State.Running}}' "$name")" == true ]] || {
    "${podman[@]}" logs "$name" 2>&1 | tail -40; echo "serve exited before answering /ping" >&2; exit 1; }
  sleep 1
done
curl -sS --fail-with-body "http://127.0.0.1:$port/ping" >/dev/null  # its own statement: set -e stops on failure
echo "GET /ping: 200"
answer="$(curl -sS --fail-with-body -H "Content-Type: application/json" \
  --data-binary "@$repo/local_test/payloads/llm_twin_request.json" "http://127.0.0.1:$port/invocations")"
echo "POST /invocations: $answer"
[[ "$answer" == *generated_text* ]] || { echo "no generated_text in the answer" >&2; exit 1; }

step "podman stop (SIGTERM, as SageMaker stops an endpoint)"
"${podman[@]}" stop -t 60 "$name" >/dev/null
code="$("${podman[@]}" inspect --format '{{.State.ExitCode}}' "$name")"
[[ $code -eq 0 ]] || { "${podman[@]}" logs "$name" 2>&1 | tail -20; echo "serve exited with $code on SIGTERM (expected 0)" >&2; exit 1; }
if curl -s -o /dev/null "http://127.0.0.1:$port/"; then echo "something still answers on port $port" >&2; exit 1; fi
step "image-test passed"
