"""The edges alone: this server against `vllm serve` where the engine costs next to nothing, in one run.

    .venv/bin/python bench/edge_only.py [--clients 32] [--rounds 5] [--new-tokens 64] [--repeats 10]
                                        [--rows chat_greedy,tgi_twin]

bench/serve_throughput.py compares the two on SmolLM2, where vLLM's engine is more than 95% of the work on
this machine's two cores and one run differs from the next by more than the edges do. A GPU shortens the
engine's step until the edge is what a request waits for, and gives the edge cores of its own; this bench
stands in for that on the CPU. The model is local_test's tiny one (2 layers, hidden 64). The cores are split:
vLLM's engine processes (its scheduler and its model worker) of both servers on the first cores, the edges'
processes (our gunicorn worker; `vllm serve`'s API server) and this bench's client on the last
VLLM_CPU_NUM_OF_RESERVED_CPU (1 unless set), where vLLM's CPU engine leaves room for its frontend anyway.
Unsplit, the scheduler process, the edges and the client met on one core and the runs were bimodal: either
server, in some runs, at a third of its own speed, its engine stepping on small batches.

The rows, prompts, sampling, schedule and figures are serve_throughput's (OpenAI chat and TGI generate
through `/invocations`, greedy and the LLM Twin sampling, against `vllm serve`'s `/v1/chat/completions`;
every row in every round, the rows rotating, who goes first alternating; the noise floor), with one asyncio
client thread (aiohttp, vLLM's own dependency) instead of 32 `requests` threads, which took the edges' core.
Both servers stay up, but only the one measured runs: the other is stopped meanwhile (serve_throughput's only()).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402  (vLLM's own dependency)

from bench.serve_throughput import (  # noqa: E402
    ROWS, SAMPLINGS, SIDES, answer_text, baseline_against_itself, prompts, run_schedule, summary, targets)
from bench.servers import both_servers, cpu_seconds, only, thread_switches  # noqa: E402
from container.model_dir import ServingSpec  # noqa: E402
from local_test.harness import process_tree  # noqa: E402
from local_test.tiny_model import build_tiny_model  # noqa: E402


async def load(target, options, sampling: dict, count) -> dict:
    """`clients` coroutines, each sending `rounds` requests back to back; /ping polled every 50 ms meanwhile.
    The figures serve_throughput's load gives, so that its summary reads them."""
    latencies, texts, pings, done = [], [], [], asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=options.clients + 2)) as session:
        async def client(i: int) -> None:
            for r in range(options.rounds):
                body = target.make_body(prompts(1, r * options.clients + i)[0], options.new_tokens, sampling)
                started = time.perf_counter()
                async with session.post(target.url + target.path, json=body) as response:
                    response.raise_for_status()
                    texts.append(answer_text(await response.json()))
                latencies.append(time.perf_counter() - started)

        async def pinger() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with session.get(target.url + "/ping") as response:
                    await response.read()
                pings.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        pid = target.edge_pid
        started, cpu, switches = time.perf_counter(), cpu_seconds(pid), thread_switches(pid)
        polling = asyncio.create_task(pinger())
        await asyncio.gather(*(client(i) for i in range(options.clients)))
        wall = time.perf_counter() - started
        cpu, switches = cpu_seconds(pid) - cpu, thread_switches(pid) - switches
        done.set()
        await polling
    tokens = sum(count(text) for text in texts)
    return {"tokens_per_second": round(tokens / wall, 1), "requests_per_second": round(len(texts) / wall, 1),
            "generated_tokens": tokens, "p50_latency_s": round(statistics.median(latencies), 3),
            "edge_cpu_ms_per_request": round(1000 * cpu / len(texts), 2),
            "edge_switches_per_request": round(switches / len(texts), 1), "pings": pings}


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` on `cores`; threads it starts later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def split_cores(sides: dict[str, tuple[str, int]], edge_count: int) -> tuple[list[int], list[int]]:
    """The engines' processes (below each edge's process) on the first cores, each edge and this bench on the
    last `edge_count`."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= edge_count:
        raise SystemExit(f"this bench needs more than {edge_count} cores (VLLM_CPU_NUM_OF_RESERVED_CPU)")
    engine_cores, edge_cores = cores[:-edge_count], cores[-edge_count:]
    for _, edge in sides.values():
        for pid in process_tree(edge):
            pin(pid, set(edge_cores if pid == edge else engine_cores))
    pin(os.getpid(), set(edge_cores))
    return engine_cores, edge_cores


def measure(root: Path, rows: list[str], options, count) -> dict:
    with both_servers(root) as (sides, started):
        engine_cores, edge_cores = split_cores(sides, int(os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"]))
        pairs = {row: dict(zip(SIDES, targets(sides["ours"], sides["vllm_serve"], row))) for row in rows}
        for side, target in pairs[rows[0]].items():  # not measured: first-batch costs
            only(sides, side)
            asyncio.run(load(target, options, SAMPLINGS["twin"], count))

        def run_one(row: str, side: str) -> dict:
            return asyncio.run(load(pairs[row][side], options, SAMPLINGS[row.split("_", 1)[1]], count))

        runs = run_schedule(sides, rows, options.repeats, run_one)
    results = {row: summary(runs[row]) for row in rows}
    for row in rows:
        for side in SIDES:
            results[row][side]["requests_per_second"] = statistics.median(r[side]["requests_per_second"]
                                                                          for r in runs[row])
    return {**started, "engine_cores": engine_cores, "edge_cores": edge_cores, **results,
            "baseline_against_itself": baseline_against_itself(runs)}


def report(results: dict, rows: list[str], options) -> None:
    print(json.dumps(results, indent=2))
    print(f"\nclients={options.clients} rounds={options.rounds} new_tokens={options.new_tokens} "
          f"repeats={options.repeats}, tiny model; engines on cores {results['engine_cores']}, edges and client "
          f"on {results['edge_cores']}")
    print(f"{'row':<12} {'ours tok/s':>10} {'vllm serve':>10} {'ratio':>6}  {'req/s':>13}  {'edge CPU ms/req':>15}  "
          f"{'switches/req':>12}  /ping p99 ms")
    for row in rows:
        ours, theirs = results[row]["ours"], results[row]["vllm_serve"]
        print(f"{row:<12} {ours['tokens_per_second']:>10} {theirs['tokens_per_second']:>10} "
              f"{results[row]['ratio']:>5}x  {ours['requests_per_second']:>6}/{theirs['requests_per_second']:<6}  "
              f"{ours['edge_cpu_ms_per_request']:>7}/{theirs['edge_cpu_ms_per_request']:<7}  "
              f"{ours['edge_switches_per_request']:>5}/{theirs['edge_switches_per_request']:<6}  "
              f"{ours['ping_p99_ms']}/{theirs['ping_p99_ms']}")
        print(f"{'':<12} ratio per run: {results[row]['ratios']}")
    print(f"noise floor (vllm serve against itself, chat row / TGI row): {results['baseline_against_itself']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="requests each client sends back to back")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10,
                        help="runs of each row on each server (even: each side goes first on a row as often)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    options = parser.parse_args()
    if options.repeats % 2:
        parser.error(f"--repeats {options.repeats}: give an even number, so each side runs first on each row as "
                     "often as the other (a side run first pays about 4% here)")
    rows = [row for row in options.rows.split(",") if row]
    if not rows or set(rows) - set(ROWS):
        parser.error(f"--rows: choose among {', '.join(ROWS)}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")  # read by both servers' engines: the edges' cores

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(build_tiny_model(root / "tiny"), root / "model")
        ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512).write(root / "model")
        tokenizer = AutoTokenizer.from_pretrained(root / "model")

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        report(measure(root, rows, options, count), rows, options)


if __name__ == "__main__":
    main()
