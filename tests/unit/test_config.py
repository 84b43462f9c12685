import pytest

from container.config import ConfigError, coerce
from train.config import TrainConfig

# The same hyperparameters as each SageMaker client writes them (reference/sagemaker-contract.md §1.3).
RAW_API = {"learning_rate": "0.0001", "gradient_checkpointing": "True", "model_id": "my-org/base",
           "lora_target_modules": "q_proj,v_proj", "max_steps": "5"}
SDK2_ESTIMATOR = {"learning_rate": "0.0001", "gradient_checkpointing": "True", "model_id": "my-org/base",
                  "lora_target_modules": "['q_proj', 'v_proj']", "max_steps": "5"}
SDK2_FRAMEWORK = {"learning_rate": "0.0001", "gradient_checkpointing": "true", "model_id": '"my-org/base"',
                  "lora_target_modules": '["q_proj", "v_proj"]', "max_steps": "5"}
SDK3_MODEL_TRAINER = {"learning_rate": "0.0001", "gradient_checkpointing": "true", "model_id": "my-org/base",
                      "lora_target_modules": '["q_proj", "v_proj"]', "max_steps": "5"}


@pytest.mark.parametrize("raw", [RAW_API, SDK2_ESTIMATOR, SDK2_FRAMEWORK, SDK3_MODEL_TRAINER],
                         ids=["raw-api", "sdk2-estimator", "sdk2-framework", "sdk3"])
def test_every_sdk_encoding_decodes_to_the_same_config(raw):
    config = TrainConfig.from_hyperparameters(raw)
    assert config == TrainConfig(learning_rate=1e-4, gradient_checkpointing="true", model_id="my-org/base",
                                 lora_target_modules=("q_proj", "v_proj"), max_steps=5)


def test_defaults_without_hyperparameters():
    config = TrainConfig.from_hyperparameters({})
    assert (config.method, config.adapter, config.lora_r, config.lora_alpha) == ("sft", "lora", 32, 32)
    assert config.lora_target_modules == ("all-linear",)


def test_unknown_key_names_the_nearest_valid_key():
    with pytest.raises(ConfigError, match="unknown hyperparameter 'learning_rte': did you mean 'learning_rate'"):
        TrainConfig.from_hyperparameters({"learning_rte": "0.1"})


def test_invalid_choice_names_the_nearest_valid_choice():
    with pytest.raises(ConfigError, match="lr_scheduler_type='cosin' is not valid: did you mean 'cosine'"):
        TrainConfig.from_hyperparameters({"lr_scheduler_type": "cosin"})


def test_report_to_takes_a_list_of_trackers_each_checked():
    assert TrainConfig.from_hyperparameters({"report_to": "TensorBoard, mlflow"}).report_to == ("tensorboard", "mlflow")
    assert TrainConfig.from_hyperparameters({"report_to": '["wandb"]'}).report_to == ("wandb",)
    with pytest.raises(ConfigError, match="report_to=tensorboard,mlfow is not valid: did you mean 'mlflow'"):
        TrainConfig.from_hyperparameters({"report_to": "tensorboard,mlfow"})
    for wrong in ("none,mlflow", "mlflow,mlflow"):
        with pytest.raises(ConfigError, match=f"report_to={wrong}: name trackers"):
            TrainConfig.from_hyperparameters({"report_to": wrong})


@pytest.mark.parametrize("key,value,message", [
    ("lora_r", "eight", "lora_r='eight': expected an integer"),
    ("lora_r", "0", "lora_r=0 must be greater than 0"),
    ("learning_rate", "fast", "expected a number"),
    ("trust_remote_code", "maybe", "expected true or false"),
    ("max_steps", "0", "max_steps=0 must be positive, or -1"),
    ("lora_dropout", "1.5", r"lora_dropout=1.5 must be in \[0, 1\)"),
    ("learning_rate", "inf", "learning_rate='inf': expected a finite number"),  # would train to inf weights
    ("beta", "NaN", "beta='NaN': expected a finite number"),  # passes every `< 0` check
    ("num_train_epochs", "1e400", "expected a finite number"),
    ("seed", "-1", r"seed=-1 must be in \[0, 4294967295\]"),  # numpy's range: set_seed would fail after loading
    ("passage_max_tokens", "16", "passage_max_tokens=16 must be at least 32"),
])
def test_bad_values_say_what_is_expected(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_hyperparameters({key: value})


def test_string_fields_keep_numeric_looking_text():
    assert coerce("model_revision", "1e5", str) == "1e5"
    assert coerce("model_revision", '"v1.0"', str) == "v1.0"


def test_integral_float_is_an_int_but_fraction_is_not():
    assert coerce("max_steps", "10.0", int) == 10
    with pytest.raises(ConfigError):
        coerce("max_steps", "10.5", int)


def test_readme_hyperparameter_table_matches_the_config():
    from pathlib import Path

    from train.config import hyperparameter_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert hyperparameter_table() in readme, "README's table is stale: paste train.config.hyperparameter_table()"


def test_learning_rates_default_by_stage_and_adapter():
    assert TrainConfig().stage_learning_rate("sft") == 2e-4
    assert TrainConfig(adapter="full").stage_learning_rate("sft") == 2e-5
    assert TrainConfig(method="sft+dpo").stage_learning_rate("dpo") == 5e-6
    assert TrainConfig(learning_rate=1e-3).stage_learning_rate("sft") == 1e-3
    assert TrainConfig(method="sft+dpo").stages == ("sft", "dpo")


@pytest.mark.parametrize("raw,message", [
    ({"adapter": "full", "export": "both"}, "export=both needs an adapter"),
    ({"method": "sft+dpo", "export": "adapter"}, "export=adapter cannot describe sft\\+dpo"),
    ({"method": "ppo"}, "did you mean 'dpo'"),
    ({"validation_split": "1.0"}, "validation_split=1.0 must be in"),
    ({"instructions": "auto", "method": "dpo"}, "reads only the `preference` channel"),
    ({"teacher_model_id": "org/teacher"}, "set instructions=auto"),
    ({"instructions": "auto", "instructions_keep": "0"}, r"instructions_keep=0.0 must be in \(0, 1\]"),
    ({"instructions": "sometimes"}, "did you mean"),
    ({"method": "grpo", "num_generations": "1"}, "needs at least 2"),
    ({"method": "sft+grpo", "style_reward_weight": "0", "overlap_reward_weight": "0", "length_reward_weight": "0",
      "repetition_reward_weight": "0"}, "every \\*_reward_weight is 0"),
    ({"method": "grpo", "length_reward_weight": "-1"}, "length_reward_weight=-1.0 must not be negative"),
    ({"method": "grpo", "preference": "auto"}, "has none"),
])
def test_combinations_that_cannot_work_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_hyperparameters(raw)
