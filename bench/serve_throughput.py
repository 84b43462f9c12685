"""Serving throughput: our server against a naive one-request-at-a-time server, in one run.

    .venv/bin/python bench/serve_throughput.py [--clients 32] [--new-tokens 64]

Both serve the embedded SmolLM2-135M-Instruct in bf16 on this machine. With N concurrent clients each
asking for `--new-tokens` greedy tokens it prints, for both: aggregate generated tokens/s, p50 and p99
latency, /ping p99 under that load; the concurrency-1 latency of each; and the same model's static
batch-N `generate` throughput (all prompts in one padded batch) as the ceiling. Then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from container.model_dir import ServingSpec, embedded_model_dir  # noqa: E402

BIN = Path(sys.executable).parent
TOPICS = ["LoRA ranks", "GPU costs", "evaluation sets", "data drift", "RAG chunking", "spot instances", "DPO pairs",
          "latency budgets"]


def prompts(n: int) -> list[str]:
    return [f"Write a long LinkedIn post about {TOPICS[i % len(TOPICS)]} and lesson {i} from our team." for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict, port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server {command} did not become ready")


def load(url: str, clients: int, new_tokens: int, rounds: int) -> dict:
    """`clients` threads, each sending `rounds` requests back to back; /ping polled meanwhile."""
    latencies, tokens, pings, done = [], [], [], threading.Event()

    def client(i: int):
        for r in range(rounds):
            body = {"inputs": prompts(clients * rounds)[i * rounds + r],
                    "parameters": {"max_new_tokens": new_tokens, "details": True}}
            started = time.perf_counter()
            answer = requests.post(url + "/invocations", json=body, timeout=600).json()
            latencies.append(time.perf_counter() - started)
            tokens.append(answer[0]["details"]["generated_tokens"])

    def pinger():
        while not done.is_set():
            started = time.perf_counter()
            try:
                requests.get(url + "/ping", timeout=5)
                pings.append(time.perf_counter() - started)
            except requests.RequestException:
                pings.append(5.0)
            time.sleep(0.05)

    ping_thread = threading.Thread(target=pinger)
    started = time.perf_counter()
    ping_thread.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    done.set()
    ping_thread.join()
    return {"tokens_per_second": round(sum(tokens) / wall, 1), "generated_tokens": sum(tokens),
            "p50_latency_s": round(statistics.median(latencies), 2),
            "p99_latency_s": round(statistics.quantiles(latencies, n=100)[98], 2) if len(latencies) > 1 else latencies[0],
            "ping_p99_ms": round(statistics.quantiles(pings, n=100)[98] * 1000, 1) if len(pings) > 1 else None}


def single_latency(url: str, new_tokens: int, n: int = 3) -> float:
    times = []
    for i in range(n):
        body = {"inputs": prompts(n)[i], "parameters": {"max_new_tokens": new_tokens, "details": True}}
        started = time.perf_counter()
        requests.post(url + "/invocations", json=body, timeout=600).raise_for_status()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def measure(command: list[str], env: dict, port: int, options, rounds: int) -> dict:
    """Start a server, measure its concurrency-1 latency and its throughput under load, stop it."""
    server = start(command, env, port)
    try:
        url = f"http://127.0.0.1:{port}"
        return {"concurrency_1_latency_s": single_latency(url, options.new_tokens),
                **load(url, options.clients, options.new_tokens, rounds)}
    finally:
        server.terminate()
        server.wait()


def static_batch_ceiling(model_dir: Path, clients: int, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts(clients)]
    batch = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        started = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
        wall = time.perf_counter() - started
    return round((out.shape[1] - batch["input_ids"].shape[1]) * clients / wall, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        shutil.copytree(embedded_model_dir(), model_dir)
        ServingSpec(base_model="embedded", max_input_tokens=2048, max_total_tokens=4096).write(model_dir)
        results = {}

        port = free_port()
        results["ours"] = measure([str(BIN / "serve")], {"SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(port),
                                                         "MAX_BATCH_SIZE": str(options.clients)}, port, options, rounds=2)
        port = free_port()
        naive = [str(BIN / "gunicorn"), "-w", "1", "--threads", "1", "--timeout", "600", "-b", f"127.0.0.1:{port}",
                 f"bench.naive_server:build('{model_dir}')"]
        results["naive"] = measure(naive, {}, port, options, rounds=1)

        results["static_batch_ceiling_tokens_per_second"] = static_batch_ceiling(model_dir, options.clients, options.new_tokens)
    print(json.dumps(results, indent=2))
    ours, naive = results["ours"], results["naive"]
    print(f"clients={options.clients} new_tokens={options.new_tokens}")
    print(f"throughput ours/naive: {ours['tokens_per_second'] / naive['tokens_per_second']:.1f}x (target >= 8)")
    print(f"throughput ours/static batch ceiling: {ours['tokens_per_second'] / results['static_batch_ceiling_tokens_per_second']:.2f} (target >= 0.8)")
    print(f"concurrency-1 latency ours/naive: {ours['concurrency_1_latency_s'] / naive['concurrency_1_latency_s']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
