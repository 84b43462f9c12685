"""TGI's serving variables become vLLM's engine arguments (no engine is started here)."""

import json

import pytest

from container.config import ConfigError
from container.model_dir import ServingSpec
from serve.config import ServeConfig
from serve.engine_args import engine_arguments, lora_wanted, max_lora_rank

SPEC = ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512)


def arguments(model_dir, spec=SPEC, **env):
    """Engine arguments for a model directory that sits at $SAGEMAKER_BASE_DIR/model."""
    assert model_dir.name == "model"
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(model_dir.parent), **env})
    return engine_arguments(config, spec, max_lora_rank(config, spec) if lora_wanted(config, spec) else 0)


@pytest.fixture
def served(tmp_path, tiny_model):
    (tmp_path / "model").symlink_to(tiny_model, target_is_directory=True)
    return tmp_path / "model"


@pytest.mark.parametrize("cpu_dtype", ["bfloat16", "float32"])
def test_cpu_defaults_use_every_core_the_cpus_fast_dtype_prefix_caching_and_a_sized_kv_cache(served, monkeypatch,
                                                                                            cpu_dtype):
    monkeypatch.setattr("serve.engine_args.cpu_dtype", lambda: cpu_dtype)  # what container/cpu_features reads
    args, environment = arguments(served)
    assert (args["model"], args["dtype"], args["max_model_len"]) == (str(served), cpu_dtype, 512)
    assert args["enable_prefix_caching"] and args["enforce_eager"] and not args["trust_remote_code"]
    assert args["load_format"] == "safetensors" and 2**28 <= args["kv_cache_memory_bytes"]
    assert environment["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_tgi_variables_map_onto_the_scheduler_and_the_kv_cache(served):
    args, _ = arguments(served, MAX_BATCH_SIZE="8", MAX_BATCH_PREFILL_TOKENS="1024", MAX_BATCH_TOTAL_TOKENS="1000",
                        MAX_TOTAL_TOKENS="256", PREFIX_CACHING="false", DTYPE="float32")
    config = json.loads((served / "config.json").read_text())
    per_token = (2 * config["num_hidden_layers"] * config["num_key_value_heads"]
                 * (config["hidden_size"] // config["num_attention_heads"]) * 4)  # keys and values in float32
    assert (args["max_num_seqs"], args["max_num_batched_tokens"], args["max_model_len"]) == (8, 1024, 256)
    assert args["kv_cache_memory_bytes"] == 1000 * per_token
    assert not args["enable_prefix_caching"] and args["dtype"] == "float32"
    bf16_args, _ = arguments(served, MAX_BATCH_TOTAL_TOKENS="1000", DTYPE="bfloat16")
    assert bf16_args["kv_cache_memory_bytes"] == 500 * per_token


def test_an_adapter_only_model_is_served_as_lora_on_its_base(tmp_path, tiny_model):
    model = tmp_path / "model"
    (model / "adapter").mkdir(parents=True)
    (model / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 24}))
    spec = ServingSpec(base_model=str(tiny_model), max_input_tokens=400, max_total_tokens=512, weights="adapter")
    args, _ = arguments(model, spec)
    assert (args["model"], args["tokenizer"]) == (str(tiny_model), str(model))
    assert args["enable_lora"] and args["max_loras"] == 1 and args["max_lora_rank"] == 32  # the next size vLLM accepts


def test_quantize_takes_tgis_names_and_refuses_8_bit(served):
    assert arguments(served, QUANTIZE="awq")[0]["quantization"] == "awq"
    assert arguments(served, HF_MODEL_QUANTIZE="fp8")[0]["quantization"] == "fp8"
    for tgis in ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"):  # vLLM 0.32 has none of them
        with pytest.raises(ConfigError, match=f"QUANTIZE={tgis} is TGI's bitsandbytes, which vLLM 0.32 does not"):
            arguments(served, QUANTIZE=tgis)
    with pytest.raises(ConfigError, match="LORA_ADAPTERS: adapter 'x' is not a folder"):
        arguments(served, LORA_ADAPTERS="x=/nowhere")
    with pytest.raises(ConfigError, match="LORA_ADAPTERS: 'tgi' names the served model itself"):
        arguments(served, LORA_ADAPTERS=f"tgi={served}")


def test_batch_transform_parameters_stay_within_sagemakers_100_mb_and_honour_its_variables():
    """CreateTransformJob refuses MaxConcurrentTransforms x MaxPayloadInMB above 100 MB."""
    def batch(**env):
        return ServeConfig.from_env({"SAGEMAKER_BATCH": "true", **env})

    assert batch().execution_parameters == {"MaxConcurrentTransforms": 2, "BatchStrategy": "MULTI_RECORD",
                                            "MaxPayloadInMB": 1}
    assert batch().timeout == 540  # under the transform job's default invocation timeout, 600 s
    assert batch().with_engine_copies(8).execution_parameters["MaxConcurrentTransforms"] == 16
    chosen = batch(SAGEMAKER_MAX_PAYLOAD_IN_MB="4", SAGEMAKER_MAX_CONCURRENT_TRANSFORMS="25",
                   SAGEMAKER_BATCH_STRATEGY="SingleRecord", SAGEMAKER_MODEL_SERVER_TIMEOUT="3500")
    assert chosen.execution_parameters == {"MaxConcurrentTransforms": 25, "BatchStrategy": "SINGLE_RECORD",
                                           "MaxPayloadInMB": 4}
    assert chosen.timeout == 3500
    assert batch(SAGEMAKER_MAX_PAYLOAD_IN_MB="60").execution_parameters["MaxConcurrentTransforms"] == 1
    assert batch().batch_body_bytes == 2**20 and chosen.batch_body_bytes == 4 * 2**20
    unlimited = batch(SAGEMAKER_MAX_PAYLOAD_IN_MB="0")  # SageMaker's "no limit": mini-batches sent chunked
    assert unlimited.execution_parameters["MaxPayloadInMB"] == 0 and unlimited.batch_body_bytes == 100 * 2**20
    assert batch(SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS="3000").timeout == 3000  # the toolkit's other spelling
    with pytest.raises(ConfigError, match="must be at most 100 .* got 32 x 6"):
        batch(SAGEMAKER_MAX_PAYLOAD_IN_MB="6", SAGEMAKER_MAX_CONCURRENT_TRANSFORMS="32")
    with pytest.raises(ConfigError, match="SAGEMAKER_BATCH_STRATEGY='ALL' is not valid"):
        batch(SAGEMAKER_BATCH_STRATEGY="ALL")


def test_a_model_in_opt_ml_model_wins_over_hf_model_id(served, tmp_path):
    from serve.model_source import model_source

    other = tmp_path / "other"
    other.mkdir()
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(served.parent), "HF_MODEL_ID": str(other)})
    assert model_source(config) == served
    empty = tmp_path / "empty"
    (empty / "model").mkdir(parents=True)
    config = ServeConfig.from_env({"SAGEMAKER_BASE_DIR": str(empty), "HF_MODEL_ID": str(other), "SM_NUM_GPUS": "4",
                                   "HF_MODEL_TRUST_REMOTE_CODE": "true"})
    assert model_source(config) == other and config.num_shard == 4 and config.trust_remote_code
    assert not ServeConfig.from_env({}).trust_remote_code


def test_a_plain_answer_comes_inside_invoke_endpoints_60_s_unless_the_timeout_is_set():
    default = ServeConfig.from_env({})
    assert (default.timeout, default.stream_timeout) == (55, 120)
    chosen = ServeConfig.from_env({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "3540"})  # e.g. an async endpoint
    assert (chosen.timeout, chosen.stream_timeout) == (3540, 3540)
    batch = ServeConfig.from_env({"SAGEMAKER_BATCH": "true"})
    assert (batch.timeout, batch.stream_timeout) == (540, 540)


def test_enable_lora_readies_the_engine_for_adapters_registered_later(served, tmp_path):
    args, _ = arguments(served, ENABLE_LORA="true")
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 4, 64)
    args, _ = arguments(served, SM_VLLM_ENABLE_LORA="true", MAX_LORAS="2", MAX_LORA_RANK="128")
    assert (args["max_loras"], args["max_lora_rank"]) == (2, 128)
    assert "enable_lora" not in arguments(served)[0]
    with pytest.raises(ConfigError, match="MAX_LORA_RANK=100 is not a rank vLLM accepts: use one of 8, 16"):
        arguments(served, ENABLE_LORA="true", MAX_LORA_RANK="100")
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text(json.dumps({"r": 32}))
    with pytest.raises(ConfigError, match="adapter 'wide' has no adapter_model.safetensors in .*wide \\(adapters"):
        arguments(served, LORA_ADAPTERS=f"wide={wide}", MAX_LORA_RANK="16")
    (wide / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="MAX_LORA_RANK=16 is below the rank of .*wide \\(32\\)"):
        arguments(served, LORA_ADAPTERS=f"wide={wide}", MAX_LORA_RANK="16")


def test_the_kv_cache_is_sized_per_gpu_when_tensor_parallelism_splits_its_heads(tmp_path):
    from serve.engine_args import kv_cache_bytes

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 16,
                                                      "num_key_value_heads": 8, "hidden_size": 1024}))
    whole = kv_cache_bytes(str(tmp_path / "config.json"), 1000, 512, 8, 2)
    assert whole == 1000 * 2 * 4 * 8 * 64 * 2  # tokens x (keys, values) x layers x heads x head_dim x bytes
    assert kv_cache_bytes(str(tmp_path / "config.json"), 1000, 512, 8, 2, shards=2) == whole // 2
    assert kv_cache_bytes(str(tmp_path / "config.json"), 1000, 512, 8, 2, shards=16) == whole // 8  # one head each


def test_on_the_cpu_each_workers_engine_takes_its_share_of_the_memory_they_all_see_free(tmp_path, monkeypatch):
    from serve import engine_args

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32, "num_attention_heads": 32,
                                                      "hidden_size": 4096}))
    monkeypatch.setattr(engine_args, "available_memory", lambda: 8 << 30)
    one = engine_args.kv_cache_bytes(str(tmp_path / "config.json"), 0, 32768, 256, 2)
    assert one == 2 << 30  # a quarter of what is free
    assert engine_args.kv_cache_bytes(str(tmp_path / "config.json"), 0, 32768, 256, 2, copies=4) == one // 4
    assert engine_args.available_memory() > 0
