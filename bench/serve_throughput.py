"""Serving throughput and latency: this server over HTTP against vLLM's own offline engine, in one run.

    .venv/bin/python bench/serve_throughput.py [--clients 32] [--new-tokens 64] [--skip-naive]

The baseline is what a user would otherwise pick: vLLM's offline `LLM.generate` (no HTTP, no server) on
the same model (the embedded SmolLM2-135M-Instruct, bf16), the same chat-templated prompts and the same
lengths, with EOS allowed. Both are measured with greedy decoding and with the LLM Twin sampling
parameters (temperature 0.7, top_p 0.9, repetition penalty 1.1). Tokens are counted the same way for
both: the generated text re-tokenized. It prints, for this server: aggregate tokens/s with N concurrent
clients, the one-stream latency, /ping p99 under that load and the time from start to /ping 200; the
same for the offline engine; the naive one-request-at-a-time server (bench/naive_server.py) for
scale; then the ratios against the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from local_test.harness import free_port  # noqa: E402

BIN = Path(sys.executable).parent
TOPICS = ["LoRA ranks", "GPU costs", "evaluation sets", "data drift", "RAG chunking", "spot instances", "DPO pairs",
          "latency budgets"]
GREEDY: dict = {}
TWIN_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
ROUNDS = 2  # each client sends this many requests back to back; the offline engine runs as many batches


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"Write a long LinkedIn post about {TOPICS[i % len(TOPICS)]} and lesson {i} from our team."
            for i in range(offset, offset + n)]


def start(command: list[str], env: dict, port: int) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return process, round(time.perf_counter() - started, 1)
        except requests.RequestException:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"server {command} did not become ready")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=60)


def load(url: str, clients: int, new_tokens: int, sampling: dict, count) -> dict:
    """`clients` threads, each sending ROUNDS LLM Twin-style requests back to back; /ping polled meanwhile."""
    latencies, tokens, pings, done = [], [], [], threading.Event()

    def client(i: int):
        for r in range(ROUNDS):
            body = {"inputs": prompts(1, r * clients + i)[0], "parameters": {"max_new_tokens": new_tokens, **sampling}}
            started = time.perf_counter()
            response = requests.post(url + "/invocations", json=body, timeout=600)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens.append(count(response.json()[0]["generated_text"]))

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
            "ping_p99_ms": round(statistics.quantiles(pings, n=100)[98] * 1000, 1) if len(pings) > 1 else None}


def single_latency(url: str, new_tokens: int, n: int = 3) -> float:
    times = []
    for text in prompts(n):
        body = {"inputs": text, "parameters": {"max_new_tokens": new_tokens}}
        started = time.perf_counter()
        requests.post(url + "/invocations", json=body, timeout=600).raise_for_status()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def measure_server(command: list[str], env: dict, port: int, options, count, samplings: dict) -> dict:
    server, ready_s = start(command, env, port)
    try:
        url = f"http://127.0.0.1:{port}"
        results = {"start_to_ping_200_s": ready_s, "one_stream_latency_s": single_latency(url, options.new_tokens)}
        for name, sampling in samplings.items():
            results[name] = load(url, options.clients, options.new_tokens, sampling, count)
        return results
    finally:
        stop(server)


def offline(model_dir: str, clients: int, new_tokens: int) -> dict:
    """vLLM's offline engine, as a user would run it: LLM.generate on the whole batch (run in its own
    process by main(), so its engine and memory are gone before and after)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def batch(offset: int, n: int) -> list:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False)
                 for p in prompts(n, offset)]
        return [TokensPrompt(prompt_token_ids=tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    started = time.perf_counter()
    llm = LLM(model=model_dir, dtype="bfloat16", enforce_eager=True, max_model_len=4096, seed=0)
    results = {"start_s": round(time.perf_counter() - started, 1)}
    times = []
    for text in batch(0, 3):
        started = time.perf_counter()
        llm.generate([text], SamplingParams(max_tokens=new_tokens, temperature=0), use_tqdm=False)
        times.append(time.perf_counter() - started)
    results["one_stream_latency_s"] = round(statistics.median(times), 3)
    for name, sampling in (("greedy", {"temperature": 0}), ("twin_sampling", TWIN_SAMPLING)):
        tokens, wall = 0, 0.0
        for r in range(ROUNDS):
            started = time.perf_counter()
            outputs = llm.generate(batch(r * clients, clients), SamplingParams(max_tokens=new_tokens, **sampling),
                                   use_tqdm=False)
            wall += time.perf_counter() - started
            tokens += sum(count(o.outputs[0].text) for o in outputs)
        results[name] = {"tokens_per_second": round(tokens / wall, 1), "generated_tokens": tokens}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-naive", action="store_true", help="the naive server takes minutes at 32 clients")
    parser.add_argument("--offline-only", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # both engines get every core
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    if options.offline_only:  # vLLM logs to stdout: the result goes to a file
        model_dir, out = options.offline_only
        Path(out).write_text(json.dumps(offline(model_dir, options.clients, options.new_tokens)))
        return

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        shutil.copytree(embedded_model_dir(), model_dir)
        ServingSpec(base_model="embedded", max_input_tokens=2048, max_total_tokens=4096).write(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        results = {}
        port = free_port()
        results["ours"] = measure_server([str(BIN / "serve")], {"SAGEMAKER_BASE_DIR": str(root),
                                                                "SAGEMAKER_BIND_TO_PORT": str(port)},
                                         port, options, count, {"greedy": GREEDY, "twin_sampling": TWIN_SAMPLING})
        print(json.dumps({"ours": results["ours"]}), flush=True)
        out = root / "offline.json"
        subprocess.run([sys.executable, __file__, "--offline-only", str(model_dir), str(out), "--clients",
                        str(options.clients), "--new-tokens", str(options.new_tokens)], capture_output=True, check=True)
        results["vllm_offline"] = json.loads(out.read_text())
        if not options.skip_naive:
            port = free_port()
            naive = [str(BIN / "gunicorn"), "-w", "1", "--threads", "1", "--timeout", "600", "-b", f"127.0.0.1:{port}",
                     f"bench.naive_server:build('{model_dir}')"]
            results["naive"] = measure_server(naive, {}, port, options, count, {"greedy": GREEDY})
    print(json.dumps(results, indent=2))
    ours, vllm = results["ours"], results["vllm_offline"]
    print(f"clients={options.clients} new_tokens={options.new_tokens} rounds={ROUNDS}")
    for name in ("greedy", "twin_sampling"):
        ratio = ours[name]["tokens_per_second"] / vllm[name]["tokens_per_second"]
        print(f"throughput {name}: ours/vLLM offline {ratio:.2f}x (target >= 0.9)")
    print(f"one-stream latency ours/vLLM offline: {ours['one_stream_latency_s'] / vllm['one_stream_latency_s']:.2f}x "
          "(target <= 1.15)")
    print(f"/ping p99 under load: {ours['greedy']['ping_p99_ms']} ms greedy, "
          f"{ours['twin_sampling']['ping_p99_ms']} ms sampling (target < 100)")
    print(f"start to /ping 200: {ours['start_to_ping_200_s']} s (vLLM offline engine start: {vllm['start_s']} s)")
    if "naive" in results:
        ratio = ours["greedy"]["tokens_per_second"] / results["naive"]["greedy"]["tokens_per_second"]
        print(f"throughput greedy: ours/naive {ratio:.1f}x (target >= 8)")


if __name__ == "__main__":
    main()
