"""Serving throughput: this server against vLLM's own OpenAI server (`vllm serve`), HTTP to HTTP, in one run.

    .venv/bin/python bench/serve_throughput.py [--clients 32] [--new-tokens 64] [--repeats 10]
                                               [--rows chat_greedy,tgi_twin] [--skip-naive]

The baseline is what a user would otherwise deploy: vLLM's OpenAI server (`python -m
vllm.entrypoints.openai.api_server`, the same venv) given the engine arguments this server gave its own
vLLM engine, read from its log line "starting vLLM: {...}" (model folder, dtype, max model length, KV
cache bytes, prefix caching, eager mode, seed), the same cores (VLLM_CPU_NUM_OF_RESERVED_CPU) and no
access log. The engines are the same, so what is compared is the edge: gunicorn + Flask + our
translation against uvicorn + FastAPI + vLLM's own. (vLLM's offline `LLM.generate`, the baseline before,
has no edge at all: it priced serving over HTTP, which `vllm serve` pays too, and nobody deploys it.)

A row is one of our dialects through `/invocations` (OpenAI chat `messages`, or TGI `{"inputs", "parameters"}`)
with greedy decoding or the LLM Twin sampling (temperature 0.7, top_p 0.9, repetition penalty 1.1), against the
same prompts and sampling through `vllm serve`'s `/v1/chat/completions`. `clients` threads each send ROUNDS
requests back to back, 64 new tokens, EOS allowed on both sides (this server has no `ignore_eos`, and rarely
does a prompt here end early); tokens are counted alike on both, the answer's text re-tokenized. /ping is polled
meanwhile. Both servers start once and stay up, the one not measured stopped (SIGSTOP: an idle vLLM model worker
polls for work); every row runs `repeats` times on each, in rounds that take the rows in rotating order, who
goes first alternating, because on a shared 2-core machine one run against the next varies by more than the
edges differ. It prints per row the median tokens/s of both, the median ratio (target >= 1.0) and each run's,
/ping p99 (target < 100 ms); the noise floor (`vllm serve` against itself on identical requests) and our chat
row over our TGI row (the same engine work through two dialects); the latency of one stream alone and of
one-token requests one at a time (the edge's own cost); the start times; and the naive one-request-at-a-time
server (bench/naive_server.py) for scale.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
from bench.servers import (  # noqa: E402
    BIN, REQUEST_TIMEOUT, both_servers, cpu_seconds, only, start, stop, thread_switches)
from local_test.harness import free_port  # noqa: E402

TOPICS = ["LoRA ranks", "GPU costs", "evaluation sets", "data drift", "RAG chunking", "spot instances", "DPO pairs",
          "latency budgets"]
SAMPLINGS = {"greedy": {"temperature": 0}, "twin": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}}
ROWS = ("chat_greedy", "chat_twin", "tgi_greedy", "tgi_twin")  # (our dialect)_(sampling)
ROUNDS = 2  # each client sends this many requests back to back
SIDES = ("ours", "vllm_serve")


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"Write a long LinkedIn post about {TOPICS[i % len(TOPICS)]} and lesson {i} from our team."
            for i in range(offset, offset + n)]


# --- the requests ----------------------------------------------------------------------------------------
def chat_body(prompt: str, new_tokens: int, sampling: dict) -> dict:
    return {"model": "llm-twin", "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            **sampling}


def tgi_body(prompt: str, new_tokens: int, sampling: dict) -> dict:
    greedy = sampling.get("temperature") == 0  # TGI's greedy is no sampling parameter at all
    return {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, **({} if greedy else sampling)}}


def answer_text(body) -> str:
    return body[0]["generated_text"] if isinstance(body, list) else body["choices"][0]["message"]["content"]


class Target:
    """One server's URL, the process that runs its edge, and the request shape of one row on it."""

    def __init__(self, url: str, edge_pid: int, path: str, make_body):
        self.url, self.edge_pid, self.path, self.make_body = url, edge_pid, path, make_body

    def post(self, prompt: str, new_tokens: int, sampling: dict) -> dict:
        response = requests.post(self.url + self.path, json=self.make_body(prompt, new_tokens, sampling),
                                 timeout=REQUEST_TIMEOUT)
        response.raise_for_status()
        return response.json()


def targets(ours: tuple[str, int], theirs: tuple[str, int], row: str) -> tuple[Target, Target]:
    """(url, edge pid) of each server -> the row's two targets."""
    dialect = chat_body if row.startswith("chat") else tgi_body
    return Target(*ours, "/invocations", dialect), Target(*theirs, "/v1/chat/completions", chat_body)


# --- the load --------------------------------------------------------------------------------------------
def load(target: Target, clients: int, new_tokens: int, sampling: dict, count) -> dict:
    """`clients` threads, each sending ROUNDS requests back to back; /ping polled meanwhile. The edge's CPU
    time per request (its pings included) prices the edge itself, less swayed than tokens/s by what else runs."""
    latencies, texts, pings, done = [], [], [], threading.Event()

    def client(i: int):
        for r in range(ROUNDS):
            started = time.perf_counter()
            texts.append(answer_text(target.post(prompts(1, r * clients + i)[0], new_tokens, sampling)))
            latencies.append(time.perf_counter() - started)

    pinger = threading.Thread(target=poll_ping, args=(target.url, pings, done), daemon=True)
    started, cpu, switches = time.perf_counter(), cpu_seconds(target.edge_pid), thread_switches(target.edge_pid)
    pinger.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
    finally:
        done.set()
    wall, cpu = time.perf_counter() - started, cpu_seconds(target.edge_pid) - cpu
    switches = thread_switches(target.edge_pid) - switches
    pinger.join()
    tokens = sum(count(text) for text in texts)
    return {"tokens_per_second": round(tokens / wall, 1), "generated_tokens": tokens,
            "p50_latency_s": round(statistics.median(latencies), 2),
            "edge_cpu_ms_per_request": round(1000 * cpu / len(texts), 2),
            "edge_switches_per_request": round(switches / len(texts), 1), "pings": pings}


def poll_ping(url: str, pings: list, done: threading.Event) -> None:
    while not done.is_set():
        started = time.perf_counter()
        try:
            requests.get(url + "/ping", timeout=5)
            pings.append(time.perf_counter() - started)
        except requests.RequestException:
            pings.append(5.0)
        time.sleep(0.05)


def p99_ms(samples: list) -> float | None:
    return round(statistics.quantiles(samples, n=100)[98] * 1000, 1) if len(samples) > 1 else None


def one_stream(target: Target, new_tokens: int, n: int = 3) -> dict:
    """Requests one at a time (chat, greedy): the median latency, and the prompt's token count, so that a
    difference in prompts between the two servers shows."""
    times, prompt_tokens = [], None
    for text in prompts(n):
        started = time.perf_counter()
        prompt_tokens = target.post(text, new_tokens, SAMPLINGS["greedy"])["usage"]["prompt_tokens"]
        times.append(time.perf_counter() - started)
    return {"latency_s": round(statistics.median(times), 3), "prompt_tokens": prompt_tokens}


def one_token(target: Target, n: int = 30) -> float:
    """The median latency, in ms, of requests one at a time for one new token: the edge's own cost (parsing,
    the chat template, tokenizing, the hand-offs to the engine and back, the answer) with the engine's work
    reduced to one short prefill and one step."""
    times = []
    for text in prompts(n, 2000):
        started = time.perf_counter()
        target.post(text, 1, SAMPLINGS["greedy"])
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 1)


def warm_up(target: Target, clients: int) -> None:
    """One short burst, not measured: first-batch costs (kernels for new shapes) are paid here."""
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda p: target.post(p, 4, SAMPLINGS["twin"]), prompts(clients, 1000)))


def schedule(rows: list[str], repeats: int) -> list[tuple[str, tuple[str, str]]]:
    """(row, the sides in the order they run) for every run: `repeats` rounds of every row, the rows' order
    rotating by one each round, and who goes first on a row alternating from one round to the next."""
    runs = []
    for repeat in range(repeats):
        for index in (i % len(rows) for i in range(repeat, repeat + len(rows))):
            runs.append((rows[index], SIDES if (index + repeat) % 2 == 0 else SIDES[::-1]))
    return runs


def run_rows(sides: dict[str, tuple[str, int]], rows: list[str], options, count) -> dict:
    """Every row once per round of repeats, on both servers back to back (the other one stopped), the rows' order
    rotating and who goes first alternating: whatever else the machine runs, and any drift of either server over
    the hour, weighs on every row and both sides alike. A row's figures are medians, its ratio the median of its
    paired ratios."""
    results, ours, theirs = {"one_stream": {}}, sides["ours"], sides["vllm_serve"]
    for side, target in zip(SIDES, targets(ours, theirs, "chat_greedy")):
        only(sides, side)
        warm_up(target, options.clients)
        results["one_stream"][side] = one_stream(target, options.new_tokens)
        results["one_stream"][side]["one_token_ms"] = one_token(target)
    pairs = {row: dict(zip(SIDES, targets(ours, theirs, row))) for row in rows}

    def run_one(row: str, side: str) -> dict:
        sampling = SAMPLINGS[row.split("_", 1)[1]]
        return load(pairs[row][side], options.clients, options.new_tokens, sampling, count)

    runs = run_schedule(sides, rows, options.repeats, run_one)
    results.update({row: summary(runs[row]) for row in rows})
    results["baseline_against_itself"] = baseline_against_itself(runs)
    results["ours_chat_over_tgi"] = baseline_against_itself(runs, "ours")
    return results


def run_schedule(sides: dict[str, tuple[str, int]], rows: list[str], repeats: int, run_one) -> dict[str, list]:
    """Every run of schedule(rows, repeats): per row, its runs, each {side: run_one(row, side)} measured with
    the other server stopped, and printed as it ends."""
    runs = {row: [] for row in rows}
    for row, order in schedule(rows, repeats):
        run = {}
        for side in order:
            only(sides, side)
            run[side] = run_one(row, side)
        runs[row].append(run)
        print(json.dumps({row: {side: {k: v for k, v in figures.items() if k != "pings"}
                                for side, figures in run.items()}}), flush=True)
    return runs


def summary(runs: list[dict]) -> dict:
    """Per side the median of each figure and /ping p99 over all its runs; the ratio ours/theirs per run."""
    row = {side: {key: round(statistics.median(run[side][key] for run in runs), 2)
                  for key in ("tokens_per_second", "generated_tokens", "p50_latency_s", "edge_cpu_ms_per_request",
                              "edge_switches_per_request")}
           for side in SIDES}
    for side in SIDES:
        row[side]["ping_p99_ms"] = p99_ms([ping for run in runs for ping in run[side]["pings"]])
    row["ratios"] = [round(run["ours"]["tokens_per_second"] / run["vllm_serve"]["tokens_per_second"], 2)
                     for run in runs]
    row["ratio"] = statistics.median(row["ratios"])
    return row


def baseline_against_itself(runs: dict[str, list[dict]], side: str = "vllm_serve") -> dict:
    """The noise floor: `vllm serve` gets the very same requests in a sampling's chat row and its TGI row (both
    are OpenAI chat to it), so the ratio of its own tokens/s between the two, repeat by repeat, is what this
    machine's noise alone makes of identical work. A row's distance from 1.0x means little inside this spread.
    side="ours": our chat row over our TGI row, the same engine work (prompt ids and sampling alike) through
    two dialects, so what our chat path costs beyond our TGI path, if anything, shows against that floor."""
    floor = {}
    for sampling in SAMPLINGS:
        chat, tgi = runs.get(f"chat_{sampling}"), runs.get(f"tgi_{sampling}")
        if chat and tgi:
            floor[sampling] = [round(a[side]["tokens_per_second"] / b[side]["tokens_per_second"], 2)
                               for a, b in zip(chat, tgi)]
    return floor


def naive(model_dir: Path, root: Path, options, count) -> dict:
    port = free_port()
    command = [str(BIN / "gunicorn"), "-w", "1", "--threads", "1", "--timeout", "600", "-b", f"127.0.0.1:{port}",
               f"bench.naive_server:build('{model_dir}')"]
    server, ready_s = start(command, {}, port, root / "naive.log")
    try:
        target = Target(f"http://127.0.0.1:{port}", server.pid, "/invocations", tgi_body)
        run = load(target, options.clients, options.new_tokens, SAMPLINGS["greedy"], count)
        return {"start_s": ready_s, "tokens_per_second": run["tokens_per_second"],
                "p50_latency_s": run["p50_latency_s"], "ping_p99_ms": p99_ms(run["pings"])}
    finally:
        stop(server)


# --- the run ---------------------------------------------------------------------------------------------
def measure(root: Path, rows: list[str], options, count) -> dict:
    """Run every row on both servers."""
    with both_servers(root) as (sides, started):
        return {**started, **run_rows(sides, rows, options, count)}


def report(results: dict, rows: list[str], options) -> None:
    print(json.dumps(results, indent=2))
    print(f"\nclients={options.clients} new_tokens={options.new_tokens} rounds={ROUNDS}")
    print(f"{'row':<12} {'ours tok/s':>10} {'vllm serve tok/s':>16} {'ratio':>6}  {'/ping p99 ours':>14} "
          f"{'/ping p99 vllm':>14}  {'edge CPU ms/request ours':>24} {'vllm':>5}  ratio per run")
    for row in rows:
        figures = results[row]
        ours, theirs = figures["ours"], figures["vllm_serve"]
        print(f"{row:<12} {ours['tokens_per_second']:>10} {theirs['tokens_per_second']:>16} {figures['ratio']:>5.2f}x  "
              f"{ours['ping_p99_ms']:>11} ms {theirs['ping_p99_ms']:>11} ms  {ours['edge_cpu_ms_per_request']:>24} "
              f"{theirs['edge_cpu_ms_per_request']:>5}  {figures['ratios']}")
    print("edge thread switches per request (ours / vllm serve): " + ", ".join(
        f"{row} {results[row]['ours']['edge_switches_per_request']} / "
        f"{results[row]['vllm_serve']['edge_switches_per_request']}" for row in rows))
    print(f"medians of {options.repeats} runs per row; targets: ratio >= 1.0 on every row; /ping p99 (ours) < 100 ms")
    for sampling, ratios in results["baseline_against_itself"].items():
        print(f"noise floor, {sampling}: vllm serve's tok/s on identical requests, its chat row over its TGI row, "
              f"per round: {ratios} (median {statistics.median(ratios):.2f}x)")
    for sampling, ratios in results["ours_chat_over_tgi"].items():
        print(f"ours, {sampling}: our chat row over our TGI row (the same engine work), per round: {ratios} "
              f"(median {statistics.median(ratios):.2f}x)")
    ours, theirs = results["one_stream"]["ours"], results["one_stream"]["vllm_serve"]
    print(f"one stream (chat, greedy): ours {ours['latency_s']} s, vllm serve {theirs['latency_s']} s "
          f"({ours['latency_s'] / theirs['latency_s']:.2f}x); prompt tokens {ours['prompt_tokens']} / "
          f"{theirs['prompt_tokens']}")
    print(f"one new token, requests one at a time (the edge's own latency): ours {ours['one_token_ms']} ms, "
          f"vllm serve {theirs['one_token_ms']} ms (medians of 30)")
    print(f"start to /ping 200: ours {results['start_s']['ours']} s, vllm serve {results['start_s']['vllm_serve']} s",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=10,
                        help="runs of each row on each server (even: each side goes first on a row as often)")
    parser.add_argument("--skip-naive", action="store_true", help="the naive server takes minutes at 32 clients")
    options = parser.parse_args()
    if options.repeats % 2:
        parser.error(f"--repeats {options.repeats}: give an even number, so each side runs first on each row as "
                     "often as the other (a side run first pays about 4% here)")
    rows = [row for row in options.rows.split(",") if row]
    if not rows or set(rows) - set(ROWS):
        parser.error(f"--rows: choose among {', '.join(ROWS)}")

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        shutil.copytree(embedded_model_dir(), model_dir)
        ServingSpec(base_model="embedded", max_input_tokens=2048, max_total_tokens=4096).write(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        results = measure(root, rows, options, count)
        report(results, rows, options)  # before the naive server, which takes longest
        if not options.skip_naive:
            naive_results = naive(model_dir, root, options, count)
            print(json.dumps({"naive": naive_results}))
            if "tgi_greedy" in rows:
                ratio = results["tgi_greedy"]["ours"]["tokens_per_second"] / naive_results["tokens_per_second"]
                print(f"tgi_greedy: ours/naive {ratio:.1f}x (target >= 8)")


if __name__ == "__main__":
    main()
