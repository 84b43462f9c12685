"""GRPO (method=grpo, sft+grpo) through the real `train` entrypoint on the tiny model: the stage trains on the CPU
(transformers' generate samples the answers), logs and reports its rewards, publishes a complete model, refuses
a step that would split a prompt's group of answers before any training, resumes after a SIGTERM, and trains
across two processes."""

import signal

import pytest

from tests.contract.test_train import fails_with
from tests.helpers import (TINY_ROWS, free_port, jsonl, link_model_channel, loads_and_generates, make_tree,
                           run_train, training_report)

# 8 rows: 6 to train on (3 prompts of 4 answers per epoch), 2 held out; SFT 2 steps, then GRPO 3 steps of one
# prompt (2 answers per micro-batch x 2 micro-batches = one group of 4)
GRPO = {"method": "sft+grpo", "max_steps": "2", "dpo_max_steps": "3", "per_device_train_batch_size": "2",
        "gradient_accumulation_steps": "2", "num_generations": "4", "max_completion_length": "12",
        "max_length": "128", "warmup_steps": "0", "validation_split": "0.25", "voice_eval_prompts": "2",
        "voice_max_new_tokens": "6"}
REWARDS = ("style", "overlap", "length", "repetition")


def job(root, tiny_model, **hyperparameters):
    make_tree(root, {**GRPO, **hyperparameters}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    return root


def trained(root) -> str:
    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def grpo_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("stage=grpo step=") and " reward=" in line]


def test_sft_then_grpo_logs_and_reports_its_rewards_and_publishes_a_complete_model(tmp_path, tiny_model):
    root = job(tmp_path, tiny_model)
    stdout = trained(root)

    assert "grpo: 4 answers per prompt of at most 12 tokens, sampled with transformers (no CUDA device); rewards " \
           "style x1, overlap x1, length x0.5, repetition x1" in stdout
    lines = grpo_lines(stdout)
    assert [line.split()[1] for line in lines] == ["step=1", "step=2", "step=3"]  # one per optimizer step
    assert all(f" rewards_{name}_mean=" in line for line in lines for name in REWARDS)
    assert "eval_reward=" in stdout  # the held-out prompts' rewards at the end of the stage

    report = training_report(root)
    assert set(report["stages"]) == {"sft", "grpo"}
    grpo = report["stages"]["grpo"]
    assert (grpo["steps"], grpo["examples"], grpo["eval_examples"], grpo["dropped"]) == (3, 6, 2, 0)
    assert grpo["learning_rate"] == 1e-5  # auto: GRPO with an adapter
    assert grpo["grpo"]["generation"] == "transformers" and grpo["grpo"]["num_generations"] == 4
    assert grpo["grpo"]["reward_weights"] == {"style": 1.0, "overlap": 1.0, "length": 0.5, "repetition": 1.0}
    first, last = grpo["grpo"]["first"], grpo["grpo"]["last"]
    assert (first["step"], last["step"]) == (1, 3)
    assert all(isinstance(entry[key], float) for entry in (first, last) for key in ("reward",) + REWARDS)
    assert {"eval_reward", "train_loss"} <= set(grpo["metrics"])
    assert {"before", "after"} <= set(grpo["voice"])  # the voice of the SFT model, then of the GRPO one

    model_dir = root / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "serving.json",
            "training_report.json", "README.md"} <= {p.name for p in model_dir.iterdir()}
    loads_and_generates(root)


@pytest.mark.parametrize("per_device, accumulation, generations, processes, expected", [
    (2, 1, 4, 1, "2 x 1 process(es) x gradient_accumulation_steps=1 = 2, must be a multiple of 4: set "
                 "per_device_train_batch_size=4, or gradient_accumulation_steps=2, or num_generations=2"),
    (3, 1, 4, 2, "= 6, must be a multiple of 4: set per_device_train_batch_size=2, or gradient_accumulation_steps=2, "
                 "or num_generations=3"),
    (1, 1, 3, 1, "= 1, must be a multiple of 3: set per_device_train_batch_size=3, or gradient_accumulation_steps=3"),
], ids=["2x1x1-answers-of-4", "3x2x1-answers-of-4", "1x1x1-answer-of-3"])
def test_a_step_that_splits_a_prompts_answers_is_refused_naming_the_nearest_settings_that_do_not(
        monkeypatch, per_device, accumulation, generations, processes, expected):
    from container.config import ConfigError
    from train.config import TrainConfig
    from train.grpo import check_grpo

    monkeypatch.setenv("WORLD_SIZE", str(processes))
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]}]
    config = TrainConfig(method="grpo", per_device_train_batch_size=per_device,
                         gradient_accumulation_steps=accumulation, num_generations=generations)
    with pytest.raises(ConfigError) as refused:
        check_grpo(config, rows)
    assert expected in str(refused.value)
    check_grpo(TrainConfig(method="grpo"), rows)  # the defaults: 2 x 8 answers, 4 groups of 4


@pytest.mark.scenario  # the refusal itself is tested above without a job; this one shows it comes before SFT
def test_sft_then_grpo_with_a_step_of_split_groups_fails_before_sft_trains(tmp_path, tiny_model):
    root = job(tmp_path, tiny_model, gradient_accumulation_steps="1")
    failure = fails_with(root, "must be a multiple of 4: set per_device_train_batch_size=4, or "
                               "gradient_accumulation_steps=2, or num_generations=2")
    assert failure.startswith("GRPO compares the num_generations=4 answers to each prompt")
    assert not (root / "checkpoints" / "sft").exists() or not any((root / "checkpoints" / "sft").iterdir())


@pytest.mark.scenario  # make test-scenarios, with the other spot restarts
def test_grpo_stopped_by_sigterm_mid_stage_resumes_from_its_checkpoint_and_trains_the_same_model(
        start_train, tmp_path, tiny_model):
    """The rerun skips the finished SFT stage, resumes GRPO from the checkpoint the stop left, and ends with the
    weights of a run never stopped, bit for bit: the same prompts, the same sampled answers (the random state
    comes back with the checkpoint), the same updates."""
    spot = {"dpo_max_steps": "5", "save_steps": "1", "save_total_limit": "5"}
    reference = job(tmp_path / "reference", tiny_model, **spot)
    trained(reference)
    root = job(tmp_path / "stopped", tiny_model, **spot)
    training = start_train(root)
    assert training.wait_for_line("stage=grpo step=2 "), "".join(training.output)[-3000:]
    training.process.send_signal(signal.SIGTERM)  # as SageMaker does when it reclaims a spot instance
    code, rest = training.finish()
    assert code == 143, rest[-3000:]
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("training stopped by SIGTERM during grpo at step "), failure
    step = int(failure.split(" at step ")[1].split()[0])
    grpo = root / "checkpoints" / "grpo"
    assert 2 <= step < 5 and (grpo / f"checkpoint-{step}" / ".complete").is_file()
    assert not (root / "model").exists() or not any((root / "model").iterdir())

    stdout = trained(root)
    assert "stage sft finished in an earlier run" in stdout  # the merged SFT model is not trained again
    assert f"resuming grpo from {grpo}/checkpoint-{step} (step {step})" in stdout
    assert [line.split()[1] for line in grpo_lines(stdout)] == [f"step={s}" for s in range(step + 1, 6)]
    report = training_report(root)
    assert report["stages"]["grpo"]["resumed_from_step"] == step and report["stages"]["grpo"]["steps"] == 5
    assert report["stages"]["grpo"]["grpo"]["first"]["step"] == 1  # the log history came back with the checkpoint
    weights = "model/model.safetensors"
    assert (root / weights).read_bytes() == (reference / weights).read_bytes()


@pytest.mark.scenario  # make test-scenarios, with the other multi-process jobs' long runs
def test_grpo_on_two_processes_groups_the_answers_across_them(tmp_path, tiny_model):
    """DDP over gloo: each process samples 2 of a prompt's 4 answers per step; the rewards are gathered and
    compared across the two, so every step sees whole groups."""
    root = job(tmp_path, tiny_model, method="grpo", gradient_accumulation_steps="1", processes_per_host="2",
               master_port=str(free_port()))
    stdout = trained(root)
    assert "world size 2" in stdout
    assert [line.split()[1] for line in grpo_lines(stdout)] == ["step=1", "step=2", "step=3"]
    grpo = training_report(root)["stages"]["grpo"]
    assert (grpo["distributed"], grpo["world_size"], grpo["steps"]) == ("ddp", 2, 3)
    assert "voice" in grpo and "eval_reward" in grpo["metrics"]
    loads_and_generates(root)
