"""Many processes and many instances: the real `train` launching torchrun workers (gloo on the CPU)."""

import json
import re
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import (TINY_ROWS, free_port, jsonl, link_model_channel, loads_and_generates, make_tree,
                           run_train, training_report)

FAST = {"max_steps": "3", "per_device_train_batch_size": "2", "gradient_accumulation_steps": "1", "max_length": "64",
        "warmup_steps": "0", "validation_split": "0"}

SCENARIO = pytest.mark.scenario  # make test-scenarios: make test keeps DDP and ZeRO-3, the two ends


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("zero2", marks=SCENARIO), "zero3",
                                      pytest.param("fsdp", marks=SCENARIO)])
def test_two_processes_on_one_host_train_a_model_that_generates(tmp_path, tiny_model, strategy):
    root = make_tree(tmp_path, {**FAST, "processes_per_host": "2", "distributed": strategy,
                                "master_port": str(free_port())},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size 2" in result.stdout
    if strategy == "zero3":  # partitioned as it loaded: no process ever held the whole model
        held = [int(n) for n in re.findall(r"ZeRO-3: rank \d holds (\d+) of the model's (\d+)", result.stdout)[0]]
        assert held[0] < held[1], result.stdout[-3000:]
    sft = training_report(root)["stages"]["sft"]
    assert (sft["distributed"], sft["world_size"], sft["steps"]) == (strategy, 2, 3)
    loads_and_generates(root)  # served for real below, after full fine-tuning under ZeRO-3


def two_hosts(start_train, tmp_path, tiny_model, hyperparameters):
    """Two instance trees on loopback: '127.0.0.1' is the first host, 'localhost' the second."""
    port = str(free_port())
    roots = []
    for current in ("127.0.0.1", "localhost"):
        root = make_tree(tmp_path / current, {**hyperparameters, "processes_per_host": "1", "master_port": port},
                         {"train/d.jsonl": jsonl(TINY_ROWS)})
        (root / "input" / "config" / "resourceconfig.json").write_text(json.dumps(
            {"current_host": current, "hosts": ["127.0.0.1", "localhost"], "network_interface_name": "lo"}))
        link_model_channel(root, tiny_model)
        roots.append(root)
    return roots, [start_train(root) for root in roots]


def test_two_hosts_train_together_and_only_the_first_writes_the_model(start_train, tmp_path, tiny_model):
    roots, hosts = two_hosts(start_train, tmp_path, tiny_model, FAST)
    codes, outputs = zip(*[host.finish(timeout=600) for host in hosts])
    assert codes == (0, 0), outputs[0][-2000:] + outputs[1][-2000:]
    assert "host 127.0.0.1 (rank 0 of 2)" in outputs[0] and "host localhost (rank 1 of 2)" in outputs[1]
    assert training_report(roots[0])["stages"]["sft"]["world_size"] == 2
    assert (roots[0] / "model" / "serving.json").is_file()
    assert not (roots[1] / "model").exists() or not any((roots[1] / "model").iterdir())
    assert (roots[1] / "checkpoints" / "sft" / "trained").is_dir()  # every host keeps what it needs to resume


def children(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split()]


def test_a_failing_rank_fails_every_host_fast_with_a_failure_file_on_each(start_train, tmp_path, tiny_model):
    roots, hosts = two_hosts(start_train, tmp_path, tiny_model, {**FAST, "max_steps": "100000"})
    # the first host logs the steps of the whole job
    assert hosts[0].wait_for_line("stage=sft step=2 "), "training never started:\n" + "".join(hosts[0].output)
    torchrun = children(hosts[1].process.pid)
    worker = children(torchrun[0]) if torchrun else []
    assert worker, f"the second host's training worker was not found: {torchrun}"
    os.kill(worker[0], signal.SIGKILL)  # as the kernel's OOM killer would
    started = time.monotonic()
    codes = [host.finish(timeout=600)[0] for host in hosts]
    assert time.monotonic() - started < 300, "the job must not hang until the collective timeout (1800 s)"
    assert all(code not in (0, 143) for code in codes), codes  # failed, not interrupted
    second = (roots[1] / "output" / "failure").read_text()
    assert second.startswith("training worker exited with code") and "host localhost" in second
    first = (roots[0] / "output" / "failure").read_text()
    assert first.startswith("rank 0 on host 127.0.0.1 failed: ")
    assert not (roots[0] / "model").exists() or not any((roots[0] / "model").iterdir())


@pytest.mark.scenario  # make test-scenarios
def test_sft_then_dpo_across_processes_and_full_fine_tuning_under_zero3(tmp_path, tiny_model, monkeypatch):
    preferences = [{"prompt": f"Write about lesson {i}.", "chosen": f"Lesson {i}: measure first.",
                    "rejected": f"Great question! Lesson {i} is crucial."} for i in range(6)]
    root = make_tree(tmp_path / "dpo", {**FAST, "method": "sft+dpo", "dpo_max_steps": "2", "processes_per_host": "2",
                                        "master_port": str(free_port()), "report_to": "mlflow"},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "preference/p.jsonl": jsonl(preferences)})
    link_model_channel(root, tiny_model)
    store = (tmp_path / "mlruns").as_uri()
    result = run_train(root, MLFLOW_TRACKING_URI=store, MLFLOW_ALLOW_FILE_STORE="true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = training_report(root)["stages"]
    assert stages["sft"]["world_size"] == stages["dpo"]["world_size"] == 2

    # one tracking run for the job (the first process's), holding both stages
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("llm-twin").experiment_id])
    assert len(runs) == 1 and {"sft/train/loss", "dpo/train/loss"} <= set(runs[0].data.metrics)

    full = make_tree(tmp_path / "full", {**FAST, "adapter": "full", "distributed": "zero3", "processes_per_host": "2",
                                         "method": "sft+dpo", "dpo_max_steps": "2", "master_port": str(free_port())},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "preference/p.jsonl": jsonl(preferences)})
    link_model_channel(full, tiny_model)
    result = run_train(full)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loads_and_generates(full)  # ZeRO-3's partitions gathered into one merged model (what serve loads)


@pytest.mark.scenario  # make test-scenarios
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_the_job_resumes(start_train, tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "max_steps": "300", "save_steps": "1000", "processes_per_host": "2",
                                "master_port": str(free_port())}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    training = start_train(root)
    assert training.wait_for_line("stage=sft step=3 "), "".join(training.output)[-3000:]
    training.process.send_signal(signal.SIGTERM)  # SageMaker signals the container's main process only
    code, rest = training.finish()
    assert code == 143, rest[-3000:]  # every rank reported an interruption: stopped, not failed
    failure = (root / "output" / "failure").read_text()
    assert "training stopped by SIGTERM during sft at step " in failure.splitlines()[0]
    step = int(failure.split(" at step ")[1].split()[0])
    assert (root / "checkpoints" / "sft" / f"checkpoint-{step}" / ".complete").is_file()

    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"(step {step})" in result.stdout and "stage=sft step=300 " in result.stdout
    assert training_report(root)["stages"]["sft"]["resumed_from_step"] == step
