"""`serve`: the SageMaker endpoint. Checks the model directory, then runs gunicorn with the Flask app."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from container.config import ConfigError
from container.model_dir import ModelDirError
from container.opt_ml import ContractError
from serve.config import ADAPTER_REGISTRY_ENV, MODEL_DIR_ENV, ServeConfig
from serve.custom import CustomCodeError, load_custom_handlers
from serve.engine_args import max_lora_rank
from serve.model_dir import serving_spec
from serve.model_source import model_source
from serve.placement import gpus_present, model_bytes, plan

SHM_NEEDED = 400 * 2**20  # vLLM's multiprocess executor keeps two message queues there (160 + 240 MiB)


def check_shared_memory(copies: int = 1, path: str = "/dev/shm") -> None:
    """vLLM's engine runs its model in worker processes on the CPU (and across GPUs) that talk through
    /dev/shm; with too little there it fails deep in its start. Say so first, with the fix."""
    free = shutil.disk_usage(path).free if os.path.isdir(path) else copies * SHM_NEEDED
    if free < copies * SHM_NEEDED:
        raise ConfigError(f"{path} has {free // 2**20} MiB free; vLLM's engine needs about {copies * SHM_NEEDED // 2**20} "
                          "MiB there: run the container with --shm-size=1g (docker run's default is 64 MiB)")


def main() -> None:
    try:
        config = ServeConfig.from_env()
        source = model_source(config)
        if source != config.model_dir:  # HF_MODEL_ID: the workers serve that folder
            print(f"serve: {config.model_dir} holds no model: serving HF_MODEL_ID={config.hf_model_id} from {source}",
                  flush=True)
            os.environ[MODEL_DIR_ENV] = str(source)
            config = ServeConfig.from_env()
        custom = load_custom_handlers(config.model_dir)
        spec = serving_spec(config.model_dir, custom)
        gpus, gpu_bytes = gpus_present()
        if config.quantize.startswith("bitsandbytes") and not gpus:
            raise ConfigError(f"QUANTIZE={config.quantize} needs a GPU: vLLM's CPU engine has no bitsandbytes kernels "
                              "(serve the 16-bit model on the CPU)")
        if config.enable_lora or config.adapters or spec.weights == "adapter":
            max_lora_rank(config, spec)  # a known adapter above MAX_LORA_RANK: say so before starting
        placement = None if config.num_shard else plan(config.workers, gpus, gpu_bytes, model_bytes(config.model_dir))
        sharded = config.num_shard > 1 or (placement is not None and placement.span_gpus)
        if (custom is None or "predict_fn" not in custom) and (not gpus or sharded):  # vLLM's worker processes
            check_shared_memory(copies=max(1, config.workers) if not gpus else 1)
    except (ConfigError, ContractError, ModelDirError, CustomCodeError) as e:
        sys.exit(f"serve: {e}")
    if config.enable_lora:  # adapters registered at run time (serve/adapters.py): one folder for every worker
        os.environ[ADAPTER_REGISTRY_ENV] = tempfile.mkdtemp(prefix="llm-twin-adapters-")
    print(f"serve: model {spec.base_model} from {config.model_dir}, port {config.port}, {config.workers} worker(s)", flush=True)
    conf = Path(__file__).with_name("gunicorn_conf.py")
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(conf), "serve.wsgi:build()"])


if __name__ == "__main__":
    main()
