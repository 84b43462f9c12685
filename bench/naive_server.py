"""The naive baseline for bench/serve_throughput.py: the scikit BYOC example's pattern with an LLM.

One gunicorn sync worker, one thread: requests are served one at a time, each with a plain
`model.generate`. Run as `gunicorn -w 1 -b 127.0.0.1:PORT 'bench.naive_server:build("MODEL_DIR")'`.
"""

import torch
from flask import Flask, jsonify, request
from transformers import AutoModelForCausalLM, AutoTokenizer

from container.cpu_features import cpu_dtype


def build(model_dir: str) -> Flask:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = getattr(torch, cpu_dtype())  # it runs on the CPU: the type serve picks there
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    app = Flask("naive")

    @app.get("/ping")
    def ping():
        return ""

    @app.post("/invocations")
    def invocations():
        body = request.get_json()
        text = tokenizer.apply_chat_template([{"role": "user", "content": body["inputs"]}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=body["parameters"]["max_new_tokens"], do_sample=False)
        new = out[0, ids["input_ids"].shape[1]:]
        return jsonify([{"generated_text": tokenizer.decode(new, skip_special_tokens=True),
                         "details": {"generated_tokens": int(new.numel())}}])

    return app
