"""instructions=auto through the real `train`: a folder of a person's posts and articles (HTML and Markdown, a
near duplicate, an empty file) → instructions written by vLLM in the job → SFT and DPO → an endpoint that
answers; a restart reuses the rows. Bad corpora fail in seconds, before torch, naming what is wrong."""

import json
import shutil
import time

import pytest

from tests.contract.test_serve import LLM_TWIN_BODY
from tests.helpers import REPO, Server, link_model_channel, make_tree, run_train
from train.data import read_jsonl

DOCUMENTS = REPO / "local_test" / "documents"
QUICK = {"instructions": "auto", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "2"}


def job_failure(root, job) -> str:
    """What failed (the job's failure file, which the log's last lines, vLLM's or torchrun's, may not say),
    then the ends of stdout (where vLLM and the job log) and stderr."""
    failure = root / "output" / "failure"
    said = failure.read_text() if failure.is_file() else "no failure file"
    return f"{said}\n--- stdout ---\n{job.stdout[-4000:]}\n--- stderr ---\n{job.stderr[-3000:]}"


@pytest.mark.scenario
@pytest.mark.smollm2
def test_a_folder_of_posts_becomes_instructions_a_twin_and_an_endpoint(tmp_path):
    root = make_tree(tmp_path / "ml", {
        "instructions": "auto", "method": "sft+dpo", "preference": "auto", "max_steps": "4", "dpo_max_steps": "2",
        "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1", "max_length": "512",
        "passage_max_tokens": "256", "validation_split": "0.15", "voice_eval_prompts": "3",
        "voice_max_new_tokens": "24", "preference_max_new_tokens": "24", "warmup_steps": "1"})
    shutil.copytree(DOCUMENTS, root / "input" / "data" / "documents")
    started = time.monotonic()
    job = run_train(root, timeout=1800)
    log = job.stdout + job.stderr
    assert job.returncode == 0, job_failure(root, job)
    first_run = time.monotonic() - started

    assert "vLLM" in log and "empty after cleaning" in log and "duplicates" in log
    empty = [line for line in log.splitlines() if "empty after cleaning" in line]
    assert any("untitled" in line for line in empty), empty  # the empty file is named
    rows = read_jsonl(root / "output" / "data" / "instructions.jsonl")
    held_out = read_jsonl(root / "output" / "data" / "instructions_validation.jsonl")
    assert rows and held_out
    assert all({"instruction", "output", "source", "passage", "score"} <= set(row) for row in rows + held_out)
    assert not {row["source"] for row in rows} & {row["source"] for row in held_out}  # whole documents held out
    report = json.loads((root / "model" / "training_report.json").read_text())
    made = report["instructions"]
    assert made["engine"] == "vLLM" and made["train"]["kept"] == len(rows) and made["held_out"]["kept"] == len(held_out)
    assert made["train"]["kept"] <= made["train"]["passed"] <= made["train"]["passages"]
    assert set(report["stages"]) == {"sft", "dpo"}
    assert report["stages"]["sft"]["examples"] == len(rows)
    assert report["stages"]["sft"]["eval_examples"] == len(held_out)
    assert report["stages"]["sft"]["voice"]["after"]["perplexity"] > 0  # measured on the held-out documents

    server = Server(root, MAX_TOTAL_TOKENS="2048")
    try:
        server.wait_ready()
        body = {**LLM_TWIN_BODY, "parameters": {**LLM_TWIN_BODY["parameters"], "max_new_tokens": 24}}
        answer = server.invoke(body)
        assert answer.status_code == 200, answer.text
        assert answer.json()[0]["generated_text"].strip()
    finally:
        server.stop_soon()

    again = run_train(root, timeout=1800)  # the same job restarted: the rows it made are reused, not made again
    assert again.returncode == 0, job_failure(root, again)
    assert "reusing the" in again.stdout and "writes the instructions" not in again.stdout
    assert read_jsonl(root / "output" / "data" / "instructions.jsonl") == rows
    print(f"instructions=auto job: {first_run:.0f} s, {made['seconds']} s of it writing instructions; "
          f"{made['train']['passages']} passages, {made['train']['passed']} passed, {made['train']['kept']} kept")


def test_a_corpus_too_small_is_refused_with_the_passages_it_gave_and_the_number_needed(tmp_path):
    root = make_tree(tmp_path, QUICK, {"documents/one.md": "# One post\n\n" + "A short thought about models. " * 20})
    job = run_train(root, timeout=120)
    assert job.returncode == 2, job.stdout + job.stderr
    failure = (root / "output" / "failure").read_text()
    assert "gave 1 training passages; at least 8 are needed" in failure, failure


def test_a_document_that_is_not_utf8_is_named(tmp_path):
    root = make_tree(tmp_path, QUICK, {"documents/good.md": "Fine text. " * 50})
    (root / "input" / "data" / "documents" / "latin1.txt").write_bytes("Café au lait, déjà vu. ".encode("latin-1"))
    job = run_train(root, timeout=120)
    assert job.returncode == 2
    failure = (root / "output" / "failure").read_text()
    assert "latin1.txt" in failure and "UTF-8" in failure, failure


@pytest.mark.scenario
def test_on_two_processes_the_first_writes_the_instructions_and_both_train_on_them(tmp_path, tiny_model):
    """instructions=auto under the launcher: the first process runs the teacher (here the tiny model, through
    vLLM), every process gets its rows, and the two train the same steps to the end."""
    root = make_tree(tmp_path, {**QUICK, "gradient_accumulation_steps": "1", "processes_per_host": "2",
                                "max_steps": "2", "passage_max_tokens": "128", "voice_eval_prompts": "0",
                                "instructions_keep": "1.0", "max_length": "384"})
    shutil.copytree(DOCUMENTS, root / "input" / "data" / "documents")
    link_model_channel(root, tiny_model)
    job = run_train(root, timeout=900)
    log = job.stdout + job.stderr
    assert job.returncode == 0, job_failure(root, job)
    assert log.count("writes the instructions of") == 1  # one teacher, on the first process
    rows = read_jsonl(root / "output" / "data" / "instructions.jsonl")
    report = json.loads((root / "model" / "training_report.json").read_text())
    assert report["stages"]["sft"]["examples"] == len(rows) and report["stages"]["sft"]["world_size"] == 2
