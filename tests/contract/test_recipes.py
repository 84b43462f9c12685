"""The fine-tuning recipes through the real `train` entrypoint; the model directories they publish load and
generate, and the kind `serve` treats differently (an adapter-only export on its base) is served for real."""

import json
import signal
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import (TINY_ROWS, jsonl, link_model_channel, loads_and_generates, make_tree, run_train,
                           training_report)

FAST = {"max_steps": "3", "dpo_max_steps": "2", "per_device_train_batch_size": "2", "gradient_accumulation_steps": "1",
        "max_length": "64", "warmup_steps": "0", "validation_split": "0"}
PREFERENCES = [{"prompt": f"Write about lesson {i}.", "chosen": f"Lesson {i}: measure first.",
                "rejected": f"Great question! Lesson {i} is crucial."} for i in range(6)]


def trained(root, **env):
    result = run_train(root, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result



def answers(serve_tree, root, **env):
    server = serve_tree(root, **env)
    response = server.invoke({"inputs": "Write about lesson 1.", "parameters": {"max_new_tokens": 4, "details": True}})
    assert response.status_code == 200, response.text
    assert response.json()[0]["details"]["generated_tokens"] >= 1
    server.stop_soon()


def test_every_format_and_file_type_trains(tmp_path, tiny_model):
    user, assistant = {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}
    root = make_tree(tmp_path, {**FAST, "validation_split": "0.2"}, {
        "train/alpaca.jsonl": jsonl(TINY_ROWS[:4]),
        "train/prompt_completion.json": json.dumps([{"prompt": "Say hi", "completion": "hi there"}] * 2),
        "train/messages.csv": "messages\n" + '"' + json.dumps([user, assistant]).replace('"', '""') + '"\n',
    })
    pq.write_table(pa.Table.from_pylist([{"prompt": [user], "completion": [assistant]}] * 2),
                   root / "input" / "data" / "train" / "conversational.parquet")
    link_model_channel(root, tiny_model)
    result = trained(root)
    assert "sft: 7 training examples from 'train', 2 for evaluation" in result.stdout
    assert "eval_loss=" in result.stdout
    sft = training_report(root)["stages"]["sft"]
    assert sft["examples"] == 7 and sft["eval_examples"] == 2 and "eval_loss" in sft["metrics"]
    loads_and_generates(root)


def test_plain_text_rows_with_a_validation_channel_and_packing(tmp_path, tiny_model):
    text = [{"text": f"Lesson {i}: measure first."} for i in range(6)]
    root = make_tree(tmp_path, {**FAST, "packing": "true"},
                     {"train/corpus.jsonl": jsonl(text), "validation/held_out.jsonl": jsonl(text[:2])})
    link_model_channel(root, tiny_model)
    result = trained(root)
    assert "sft: 6 training examples from 'train', 2 for evaluation (the 'validation' channel)" in result.stdout
    sft = training_report(root)["stages"]["sft"]
    assert sft["packing"] is True and "eval_loss" in sft["metrics"]


def test_long_rows_are_counted_not_dropped_silently(tmp_path, tiny_model):
    long = [{"instruction": "Write a long post.", "output": "word " * 200}] * 2
    root = make_tree(tmp_path, {**FAST, "max_length": "32"}, {"train/d.jsonl": jsonl(TINY_ROWS[:2] + long)})
    link_model_channel(root, tiny_model)
    result = trained(root)
    assert "examples truncated to max_length=32" in result.stdout
    assert training_report(root)["stages"]["sft"]["truncated"] >= 2


def test_sft_then_dpo_and_dpo_alone_from_a_model_tarball(tmp_path, tiny_model):
    first = make_tree(tmp_path / "first", {**FAST, "method": "sft+dpo"},
                      {"train/d.jsonl": jsonl(TINY_ROWS), "preference/p.jsonl": jsonl(PREFERENCES)})
    link_model_channel(first, tiny_model)
    result = trained(first)
    assert "stage=sft step=3 " in result.stdout and "stage=dpo step=2 " in result.stdout
    assert "rewards_margins=" in result.stdout
    assert set(training_report(first)["stages"]) == {"sft", "dpo"}
    loads_and_generates(first)

    # An earlier job's model.tar.gz as the `model` channel: DPO continues from it.
    second = make_tree(tmp_path / "second", {**FAST, "method": "dpo", "beta": "0.1", "dpo_loss_type": "ipo"},
                       {"preference/p.jsonl": jsonl(PREFERENCES)})
    channel = second / "input" / "data" / "model"
    channel.mkdir(parents=True)
    with tarfile.open(channel / "model.tar.gz", "w:gz") as archive:
        for path in (first / "model").iterdir():
            archive.add(path, arcname=path.name)
    result = trained(second)
    assert "extracting" in result.stdout and "stage=dpo step=2 " in result.stdout
    loads_and_generates(second)


def test_qlora_loads_4bit_and_merges_onto_the_16bit_base(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "adapter": "qlora"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = trained(root)
    assert "in 4-bit nf4 (bitsandbytes): 14 Linear4bit layers" in result.stdout
    config = json.loads((root / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(root / "model" / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert all(weights.get_tensor(n).dtype.is_floating_point for n in names)
    assert not any("lora" in n or "absmax" in n or "quant" in n for n in names)
    loads_and_generates(root)


def test_full_fine_tuning(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "adapter": "full", "method": "sft+dpo"},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "preference/p.jsonl": jsonl(PREFERENCES)})
    link_model_channel(root, tiny_model)
    trained(root)  # DPO's frozen reference is TRL's own load of the SFT model (safetensors, its commit for a hub base)
    report = training_report(root)["stages"]
    assert (report["sft"]["learning_rate"], report["dpo"]["learning_rate"]) == (2e-5, 5e-7)
    loads_and_generates(root)


def adapter_export(tmp_path, tiny_model) -> tuple:
    """export=adapter on the tiny model playing the embedded base: model/ holds the adapter, not merged weights."""
    embedded = {"LLM_TWIN_EMBEDDED_MODEL_DIR": str(tiny_model)}
    adapter = make_tree(tmp_path / "adapter", {**FAST, "export": "adapter"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    trained(adapter, **embedded)
    names = {p.name for p in (adapter / "model").iterdir()}
    assert "adapter" in names and "model.safetensors" not in names
    assert json.loads((adapter / "model" / "serving.json").read_text())["base_model"] == "embedded"
    return adapter, embedded


def test_an_adapter_export_holds_the_adapter_and_names_its_base(tmp_path, tiny_model):
    adapter_export(tmp_path, tiny_model)


@pytest.mark.scenario  # make test-scenarios
def test_an_adapter_export_is_served_on_its_base(tmp_path, tiny_model, serve_tree):
    adapter, embedded = adapter_export(tmp_path, tiny_model)
    answers(serve_tree, adapter, **embedded)


@pytest.mark.scenario  # make test-scenarios
def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes_to_the_planned_end(start_train, tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "max_steps": "400", "save_steps": "1000", "logging_steps": "1"},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    training = start_train(root)
    assert training.wait_for_line("stage=sft step=5 "), "".join(training.output)[-3000:]
    training.process.send_signal(signal.SIGTERM)  # what SageMaker sends on a spot interruption
    code, rest = training.finish()
    assert code == 143, rest[-3000:]  # 128 + SIGTERM: stopped, not failed
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("training stopped by SIGTERM during sft at step ")
    stopped_at = int(failure.split(" at step ")[1].split()[0])
    assert 5 <= stopped_at < 400
    assert (root / "checkpoints" / "sft" / f"checkpoint-{stopped_at}" / ".complete").is_file()
    assert not (root / "model").exists() or not any((root / "model").iterdir())

    # A half-written newer checkpoint (a kill mid-save) is never resumed from.
    (root / "checkpoints" / "sft" / f"checkpoint-{stopped_at + 1}").mkdir()
    result = trained(root)
    assert f"resuming sft from {root}/checkpoints/sft/checkpoint-{stopped_at} (step {stopped_at})" in result.stdout
    assert "removing incomplete checkpoint" in result.stdout
    assert "stage=sft step=400 " in result.stdout
    assert f"stage=sft step={stopped_at} train_loss" not in result.stdout  # no step is run twice
    sft = training_report(root)["stages"]["sft"]
    assert sft["steps"] == 400 and sft["resumed_from_step"] == stopped_at
    assert not (root / "output" / "failure").exists()


def test_metric_definitions_match_the_log_lines():
    import re

    from container.metrics import METRIC_DEFINITIONS
    from train.metrics import format_log_line

    line = format_log_line("sft", 10, {"loss": 1.5, "learning_rate": 2e-4, "grad_norm": 0.5, "tokens_per_second": 812.3,
                                       "epoch": 0.5})
    eval_line = format_log_line("sft", 10, {"eval_loss": 1.25})
    dpo_line = format_log_line("dpo", 3, {"loss": 0.69, "rewards/accuracies": 0.75, "rewards/margins": 0.01})
    found = {}
    for definition in METRIC_DEFINITIONS:
        for text in (line, eval_line, dpo_line):
            match = re.search(definition["Regex"], text)
            if match:
                found.setdefault(definition["Name"], float(match.group(1)))
    assert found == {"train:loss": 1.5, "eval:loss": 1.25, "train:learning_rate": 2e-4, "train:grad_norm": 0.5,
                     "train:tokens_per_second": 812.3, "train:epoch": 0.5, "dpo:rewards_accuracies": 0.75,
                     "dpo:rewards_margins": 0.01}
    summary = format_log_line("sft", 10, {"train_runtime": 3.0, "train_loss": 1.4})
    assert not re.search(METRIC_DEFINITIONS[0]["Regex"], summary)  # the run's average is not a step's loss


UNPAIRED = [{"prompt": f"Write about lesson {i}.", "completion": f"Lesson {i}: measure first.", "label": i % 2 == 0}
            for i in range(6)]


@pytest.mark.parametrize("method, files, adapter", [
    ("orpo", {"preference/p.jsonl": jsonl(PREFERENCES)}, "lora"),
    ("simpo", {"preference/p.jsonl": jsonl(PREFERENCES)}, "lora"),
    ("kto", {"preference/u.jsonl": jsonl(UNPAIRED)}, "lora"),
    ("sft+kto", {"train/d.jsonl": jsonl(TINY_ROWS), "preference/p.jsonl": jsonl(PREFERENCES)}, "lora"),  # unpaired
    # ORPO and SimPO compare with no reference: TRL refuses the reference's loading arguments for them
    ("orpo", {"preference/p.jsonl": jsonl(PREFERENCES)}, "full"),
])
def test_orpo_simpo_and_kto_train_a_few_steps_into_a_model_that_generates(tmp_path, tiny_model, method, files,
                                                                         adapter):
    root = make_tree(tmp_path, {**FAST, "method": method, "adapter": adapter}, files)
    link_model_channel(root, tiny_model)
    trained(root)
    stage = method.split("+")[-1]
    assert training_report(root)["stages"][stage]["steps"] == 2
    loads_and_generates(root)


def test_preference_auto_builds_pairs_from_the_persons_writing_and_dpo_trains_on_them(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "method": "sft+dpo", "preference": "auto", "preference_max_new_tokens": "8"},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    trained(root)
    pairs = [json.loads(line) for line in (root / "model" / "preference_pairs.jsonl").read_text().splitlines()]
    answers = {row["output"] for row in TINY_ROWS}
    assert 0 < len(pairs) <= len(TINY_ROWS)
    for pair in pairs:  # the person's answer chosen, the SFT model's own answer rejected
        assert pair["chosen"][-1]["content"] in answers and pair["rejected"][-1]["content"] not in answers
        assert pair["rejected"][-1]["role"] == "assistant"
    assert (training_report(root)["stages"]["dpo"]["examples"] == len(pairs)
            and training_report(root)["stages"]["dpo"]["steps"] == 2)


def test_a_kto_row_without_a_boolean_label_names_its_file_and_line(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "method": "kto"},
                     {"preference/u.jsonl": jsonl(UNPAIRED[:2] + [{**UNPAIRED[0], "label": "yes"}])})
    result = run_train(root)
    assert result.returncode == 2
    failure = (root / "output" / "failure").read_text()
    assert "u.jsonl:3:" in failure and "'label' must be true (a good answer) or false" in failure, failure
