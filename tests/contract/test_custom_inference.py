"""code/inference.py in the model dir replaces the built-in handlers (SageMaker HF toolkit convention)."""

import shutil
import subprocess

import requests
import torch

from tests.helpers import BIN

WRAPPING_HANDLERS = '''
import json

def input_fn(body, content_type, context):
    assert context.model_dir
    if content_type.startswith("text/plain"):
        return {"inputs": body.decode(), "parameters": {"max_new_tokens": 3, "details": True}}
    return json.loads(body)

def output_fn(prediction, accept):
    answer = prediction[0]
    return json.dumps({"answer": answer["generated_text"], "tokens": answer["details"]["generated_tokens"],
                       "accept": accept})
'''

OWN_MODEL = '''
def model_fn(model_dir):
    return {"suffix": "!"}

def predict_fn(data, model, context):
    if data.get("fail"):
        raise ValueError("asked to fail")
    return {"echo": data["text"][::-1] + model["suffix"]}
'''

BUILT_IN_MODEL = '''
def predict_fn(data, model):
    tokenizer, model = model["tokenizer"], model["model"]
    ids = tokenizer(data["text"], return_tensors="pt").to(model.device)
    out = model.generate(**ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return {"new_tokens": out.shape[1] - ids["input_ids"].shape[1], "device": model.device.type}
'''


def test_input_and_output_fn_wrap_the_built_in_model(tmp_path, tiny_served_model, serve_tree):
    root = tmp_path / "tree"
    shutil.copytree(tiny_served_model, root)
    (root / "model" / "code").mkdir()
    (root / "model" / "code" / "inference.py").write_text(WRAPPING_HANDLERS)
    server = serve_tree(root)
    response = server.invoke("Write about evals",
                             headers={"Content-Type": "text/plain", "Accept": "application/x-custom"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["tokens"] == 3 and answer["accept"] == "application/x-custom" and answer["answer"]
    assert response.headers["Content-Type"].startswith("application/x-custom")
    bad = server.invoke("{not json", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("input_fn failed: JSONDecodeError")


def test_model_fn_and_predict_fn_replace_the_model(tmp_path, serve_tree):
    (tmp_path / "model" / "code").mkdir(parents=True)
    (tmp_path / "model" / "code" / "inference.py").write_text(OWN_MODEL)
    server = serve_tree(tmp_path)
    assert server.invoke({"text": "abc"}).json() == {"echo": "cba!"}
    failed = server.invoke({"text": "abc", "fail": True})
    assert failed.status_code == 424 and failed.json() == {"error": "predict_fn failed: ValueError: asked to fail",
                                                           "error_type": "generation"}


def test_model_fn_without_predict_fn_is_refused_at_start(tmp_path):
    (tmp_path / "model" / "code").mkdir(parents=True)
    (tmp_path / "model" / "code" / "inference.py").write_text("def model_fn(model_dir):\n    return 1\n")
    result = subprocess.run([str(BIN / "serve")], env={"SAGEMAKER_BASE_DIR": str(tmp_path), "PATH": str(BIN)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "model_fn without predict_fn" in result.stderr


def test_predict_fn_alone_gets_the_model_dirs_transformers_model_on_the_instances_device(
        tmp_path, tiny_served_model, serve_tree):
    root = tmp_path / "tree"
    shutil.copytree(tiny_served_model, root)
    (root / "model" / "code").mkdir()
    (root / "model" / "code" / "inference.py").write_text(BUILT_IN_MODEL)
    server = serve_tree(root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert server.invoke({"text": "Write about evals"}).json() == {"new_tokens": 3, "device": device}
    info = requests.get(server.url + "/info", timeout=30).json()
    assert (info["model_dtype"], info["model_device_type"]) == ("torch.float32", device)  # the loaded model's
