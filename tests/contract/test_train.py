"""The real `train` entrypoint on temporary /opt/ml trees."""

import json
import shutil

import pytest

from container.model_dir import SERVING_SPEC_FILE, load_spec
from tests.helpers import TINY_ROWS, jsonl, link_model_channel, make_tree, run_train

FAST = {"max_steps": "2", "per_device_train_batch_size": "2", "gradient_accumulation_steps": "1", "max_length": "64",
        "warmup_steps": "0", "logging_steps": "1", "validation_split": "0"}


def test_trains_on_instruction_and_messages_data_and_writes_a_loadable_model(tmp_path, tiny_model):
    messages = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}] * 3
    root = make_tree(tmp_path, {**FAST, "export": "both"}, {"train/posts.jsonl": jsonl(TINY_ROWS),
                                                            "train/chat/conversations.jsonl": jsonl(messages)})
    link_model_channel(root, tiny_model)

    result = run_train(root)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "output" / "failure").exists()
    assert "sft: 11 training examples from 'train', 0 for evaluation" in result.stdout
    assert "stage=sft step=2 train_loss=" in result.stdout  # one regex-friendly metrics line per logging step
    model_dir = root / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", SERVING_SPEC_FILE,
            "training_report.json"} <= {p.name for p in model_dir.iterdir()}
    assert not (root / "model.partial").exists()
    assert load_spec(model_dir).weights == "merged" and load_spec(model_dir).has_adapter  # export=both
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (model_dir / "adapter").iterdir()}
    report = json.loads((model_dir / "training_report.json").read_text())
    assert report["stages"]["sft"]["steps"] == 2 and report["stages"]["sft"]["examples"] == 11
    assert report["config"]["lora_r"] == 32 and report["stages"]["sft"]["metrics"]["train_loss"] > 0
    assert (model_dir / "chat_template.jinja").read_text() == (tiny_model / "chat_template.jinja").read_text()
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in model_dir.iterdir())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2
    assert not any("lora" in name for name, _ in model.named_parameters())  # the adapter was merged
    assert tokenizer.chat_template


def fails_with(root, *expected) -> str:
    result = run_train(root)
    assert result.returncode != 0, result.stdout
    failure = (root / "output" / "failure").read_text()
    for text in expected:
        assert text in failure
    assert len(failure) <= 1024
    model_dir = root / "model"
    assert not model_dir.exists() or not any(model_dir.iterdir()), "model/ must stay empty on failure"
    assert not (root / "model.partial").exists()
    return failure


def test_bad_hyperparameter_names_key_and_nearest_valid_one(tmp_path):
    root = make_tree(tmp_path, {"lora_rank": "8"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    failure = fails_with(root, "unknown hyperparameter 'lora_rank'", "did you mean 'lora_r'")
    assert failure.count("\n") == 0  # a user error is one clear line, no traceback


def test_missing_channel_is_named(tmp_path):
    root = make_tree(tmp_path, FAST, {"training/d.jsonl": jsonl(TINY_ROWS)})
    fails_with(root, "input channel 'train' is missing", "channels present: training")


def test_malformed_row_names_file_and_line(tmp_path):
    text = jsonl(TINY_ROWS[:3]) + '{"instruction": "broken", "output": \n'
    root = make_tree(tmp_path, FAST, {"train/posts.jsonl": text})
    fails_with(root, "posts.jsonl:4: invalid JSON")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    root = make_tree(tmp_path, FAST, {"train/posts.jsonl": jsonl(TINY_ROWS[:2])})
    with (root / "input" / "data" / "train" / "posts.jsonl").open("ab") as f:
        f.write(b'{"instruction": "caf\xe9", "output": "x"}\n')  # Latin-1, as an old export writes it
    fails_with(root, "posts.jsonl:3: not UTF-8 text (invalid byte 0xe9")


def test_an_answer_length_the_base_model_cannot_hold_fails_before_training(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "model_id": str(tiny_model), "max_new_tokens": "512"},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    failure = fails_with(root, "max_new_tokens=512 leaves no room for a prompt", "context of 512 tokens")
    assert failure.count("\n") == 0


def test_checkpoints_of_another_training_are_refused_not_resumed(tmp_path, tiny_model):
    root = make_tree(tmp_path, FAST, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    first = run_train(root)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for fresh in ("model", "output"):  # a new job on the same checkpoint URI, with other data
        shutil.rmtree(root / fresh, ignore_errors=True)
        (root / fresh).mkdir()
    (root / "input" / "data" / "train" / "d.jsonl").write_text(jsonl(TINY_ROWS[:-2]))
    fails_with(root, "are another training's (data differ)", "give it a new checkpoint S3 URI")


def test_evaluations_asked_for_without_held_out_data_fail_before_training(tmp_path):
    root = make_tree(tmp_path, {**FAST, "eval_steps": "2"}, {"train/d.jsonl": jsonl(TINY_ROWS)})  # split 0
    fails_with(root, "eval_steps=2 asks for evaluations, but sft has no held-out data", "validation_split > 0")


def test_empty_data_file_is_named(tmp_path):
    root = make_tree(tmp_path, FAST, {"train/posts.jsonl": ""})
    fails_with(root, "posts.jsonl: the file has no examples")


def test_framework_error_reports_type_and_leaves_model_empty(tmp_path):
    root = make_tree(tmp_path, {**FAST, "model_id": str(tmp_path / "no-such-model")},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    failure = fails_with(root, "training failed:")
    first, *details = failure.splitlines()
    # The short, actionable first line (what SageMaker shows as FailureReason): the error's type and message,
    # naming what was asked for; then the end of the traceback, where it was raised.
    assert first.startswith("training failed: OSError: ") and str(tmp_path / "no-such-model") in first, first
    assert any(line.strip().startswith("File \"") for line in details), failure


@pytest.mark.smollm2
def test_embedded_default_model_is_used_when_none_is_named(smollm2_twin):
    root = smollm2_twin  # trained with no model_id and no model channel
    assert json.loads((root / "model" / SERVING_SPEC_FILE).read_text())["base_model"] == "embedded"
    assert "SmolLM2-135M-Instruct" in json.loads((root / "model" / "training_report.json").read_text())["base_model"]


def test_pipe_mode_fails_clearly(tmp_path):
    root = make_tree(tmp_path / "b", FAST, {"train/d.jsonl": jsonl(TINY_ROWS)})
    (root / "input" / "config" / "inputdataconfig.json").write_text(
        json.dumps({"train": {"TrainingInputMode": "Pipe"}}))
    fails_with(root, "Pipe input mode")


def test_a_sharded_channel_on_several_instances_is_refused_naming_the_fix(tmp_path):
    root = make_tree(tmp_path / "s", FAST, {"train/d.jsonl": jsonl(TINY_ROWS)})
    config = root / "input" / "config"
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {"TrainingInputMode": "File",
                                                                       "S3DistributionType": "ShardedByS3Key"}}))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1", "algo-2"]}))
    fails_with(root, "the 'train' channel is ShardedByS3Key")
    assert "use FullyReplicated" in (root / "output" / "failure").read_text()
