"""local_test's no-Docker scripts and payloads, run for real (tiny model, temporary tree): data in a channel →
`train` → /opt/ml/model → `serve` → an answer over HTTP, in every payload the scripts ship."""

import json
import os
import subprocess

import pytest

from tests.helpers import (REAP_SECONDS, REPO, TINY_ROWS, free_port, jsonl, link_model_channel, make_tree,
                           wait_for_ping)

SCRIPTS = REPO / "local_test"


@pytest.mark.scenario  # make test-scenarios: the scripts' path end to end (train and serve keep their own tests)
def test_train_serve_predict_without_docker(tmp_path, tiny_model):
    root = make_tree(tmp_path, {"max_steps": "2", "per_device_train_batch_size": "2", "max_length": "64",
                                "validation_split": "0"}, {"train/d.jsonl": jsonl(TINY_ROWS)})
    link_model_channel(root, tiny_model)
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(root), "PORT": str(free_port())}
    trained = subprocess.run([str(SCRIPTS / "train_local_nodocker.sh")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(SCRIPTS / "serve_local_nodocker.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_ping(f"http://127.0.0.1:{env['PORT']}", 200, timeout=180, process=server)
        for payload, content_type, check in [
            ("llm_twin_request.json", "application/json", lambda out: json.loads(out)[0]["generated_text"]),
            ("chat_request.json", "application/json", lambda out: json.loads(out)["choices"][0]["message"]),
            ("stream_request.json", "application/json", lambda out: out.startswith("data:")),
            ("batch.jsonl", "application/jsonlines", lambda out: len(out.strip().splitlines()) == 3),
        ]:
            result = subprocess.run([str(SCRIPTS / "predict_nodocker.sh"), str(SCRIPTS / "payloads" / payload),
                                     content_type],
                                    env=env, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and check(result.stdout), (payload, result.stdout, result.stderr)
    finally:
        server.terminate()
        server.wait(timeout=REAP_SECONDS)  # gunicorn drains for up to 25 s
        log.close()
