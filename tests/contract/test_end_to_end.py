"""Data in a channel → `train` → /opt/ml/model → `serve` → an answer over HTTP."""

import shutil

import pytest

from tests.conftest import REPO, TINY_ROWS, jsonl, link_model_channel, make_tree, run_train
from tests.contract.test_serve import LLM_TWIN_BODY


def test_train_then_serve_the_tiny_model(tmp_path, tiny_model, serve_tree):
    root = make_tree(tmp_path, {"max_steps": "3", "per_device_train_batch_size": "4", "max_length": "64"},
                     {"train/posts.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root)
    assert result.returncode == 0, result.stdout + result.stderr

    server = serve_tree(root)
    response = server.invoke(LLM_TWIN_BODY)
    assert response.status_code == 200, response.text
    assert response.json()[0]["generated_text"].strip()


@pytest.mark.smollm2
def test_smollm2_twin_trained_on_the_sample_data_answers(tmp_path, serve_tree):
    """The demo's path on the real embedded model: a short SFT on local_test's data, then a real answer."""
    root = tmp_path / "opt_ml"
    shutil.copytree(REPO / "local_test" / "test_dir" / "input", root / "input", ignore=shutil.ignore_patterns("scratch"))
    make_tree(root, {"max_steps": "4", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
                     "max_length": "256", "warmup_steps": "0", "learning_rate": "1e-4"})
    result = run_train(root)
    assert result.returncode == 0, result.stdout + result.stderr

    server = serve_tree(root)
    body = {**LLM_TWIN_BODY, "parameters": {**LLM_TWIN_BODY["parameters"], "max_new_tokens": 40}}
    text = server.invoke(body).json()[0]["generated_text"]
    words = text.split()
    assert len(words) >= 5, text
    assert sum(w.isascii() for w in words) / len(words) > 0.8, text  # English prose, not token soup
