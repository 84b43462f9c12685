"""GPU paths: training in bf16 on CUDA and serving on CUDA (vLLM), FP8 too. Skipped cleanly without a GPU."""

import pytest
import requests

from tests.helpers import TINY_ROWS, jsonl, link_model_channel, make_tree, run_train, training_report

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_in_bf16_on_cuda_then_serve_on_cuda(tmp_path, tiny_model, serve_tree):
    pytest.importorskip("vllm", reason="serving needs vLLM (the GPU check machine cannot carry its CUDA wheel)")
    root = make_tree(tmp_path, {"max_steps": "3", "per_device_train_batch_size": "4", "max_length": "64",
                                "bf16": "auto"},
                     {"train/posts.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root)
    assert result.returncode == 0, result.stdout + result.stderr
    report = training_report(root)
    assert (report["device"] != "cpu", report["precision"]) == (True, "bf16"), report  # trained on the GPU, bf16

    server = serve_tree(root)
    response = server.invoke({"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}})
    assert response.status_code == 200, response.text
    assert response.json()[0]["details"]["generated_tokens"] >= 1
    assert requests.get(server.url + "/info", timeout=30).json()["model_device_type"] == "cuda"
    assert "model ready: vLLM engine" in server.stop()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9 (L4, L40S, H100)")
def test_serve_fp8_in_flight_on_cuda(tiny_served_model, serve_tree):
    pytest.importorskip("vllm", reason="serving needs vLLM")
    server = serve_tree(tiny_served_model, QUANTIZE="fp8")
    response = server.invoke({"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}})
    assert response.status_code == 200, response.text
    assert '"quantization": "fp8"' in server.stop()


def test_qlora_4bit_on_cuda(tmp_path, tiny_model):
    root = make_tree(tmp_path, {"max_steps": "3", "per_device_train_batch_size": "4", "max_length": "64",
                                "adapter": "qlora"},
                     {"train/posts.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Linear4bit layers" in result.stdout
    assert training_report(root)["device"] != "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_two_gpus_over_nccl(tmp_path, tiny_model, strategy):
    from tests.helpers import free_port

    root = make_tree(tmp_path, {"max_steps": "3", "per_device_train_batch_size": "4", "max_length": "64",
                                "distributed": strategy, "master_port": str(free_port())},
                     {"train/posts.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    result = run_train(root)  # processes_per_host defaults to the GPU count
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in result.stdout
