"""The edges alone: this server against `vllm serve` where the engine costs next to nothing, in one run.

    .venv/bin/python bench/edge_only.py [--clients 32] [--rounds 5] [--new-tokens 64] [--pairs 8]

bench/serve_throughput.py compares the two on SmolLM2, where vLLM's engine is more than 95% of the work on
this machine's two cores and one run differs from the next by more than the edges do. A GPU shortens the
engine's step until the edge is what a request waits for; this bench stands in for that on the CPU: local_test's
tiny model (2 layers, hidden 64), vLLM's engine given one core (VLLM_CPU_NUM_OF_RESERVED_CPU=1, so both
engines spin on the same core and the edges have the other), and one asyncio client thread (32 client threads
of `requests` took the edges' core from them). Both servers get the same engine arguments (read from ours's
log, as serve_throughput does), the same prompts, OpenAI chat, greedy; they run in pairs, who goes first
alternating. Per run: requests/s, the edge's CPU ms and thread switches per request, /ping p99; then each
pair's ratio (ours / vllm serve requests/s) and their median.

Meant for a machine with cores to spare. On the 2-core development machine, where the client, the pinger, both
edges and the engine's own Python threads share the one core the engine leaves, the runs are bimodal: in some,
one server (either) stalls, its /ping p99 in seconds and its requests/s a fifth of the other's; three sessions
of it gave median pair ratios of 0.30x, 0.64x and 1.98x. Read it there for what each edge spends per request,
not for who is faster.
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
    SAMPLINGS, answer_text, both_servers, chat_body, cpu_seconds, p99_ms, prompts, thread_switches)
from container.model_dir import ServingSpec  # noqa: E402
from local_test.tiny_model import build_tiny_model  # noqa: E402


async def load(url: str, path: str, pid: int, options) -> dict:
    """`clients` coroutines, each sending `rounds` requests back to back; /ping polled every 50 ms meanwhile."""
    answers, pings, done = [], [], asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=options.clients + 2)) as session:
        async def client(i: int) -> None:
            for r in range(options.rounds):
                body = chat_body(prompts(1, r * options.clients + i)[0], options.new_tokens, SAMPLINGS["greedy"])
                async with session.post(url + path, json=body) as response:
                    response.raise_for_status()
                    answers.append(answer_text(await response.json()))

        async def pinger() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with session.get(url + "/ping") as response:
                    await response.read()
                pings.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        started, cpu, switches = time.perf_counter(), cpu_seconds(pid), thread_switches(pid)
        polling = asyncio.create_task(pinger())
        await asyncio.gather(*(client(i) for i in range(options.clients)))
        wall = time.perf_counter() - started
        done.set()
        await polling
    n = len(answers)
    return {"requests_per_s": round(n / wall, 1), "answer_chars": sum(map(len, answers)),
            "edge_cpu_ms_per_request": round(1000 * (cpu_seconds(pid) - cpu) / n, 2),
            "edge_switches_per_request": round((thread_switches(pid) - switches) / n, 1),
            "ping_p99_ms": p99_ms(pings)}


def measure(root: Path, options) -> list[dict]:
    with both_servers(root) as (sides, _):
        paths = {"ours": "/invocations", "vllm_serve": "/v1/chat/completions"}
        for name, (url, pid) in sides.items():
            asyncio.run(load(url, paths[name], pid, options))  # not measured: first-batch costs
        pairs = []
        for i in range(options.pairs):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            pairs.append({name: asyncio.run(load(sides[name][0], paths[name], sides[name][1], options))
                          for name in order})
            print(json.dumps(pairs[-1]), flush=True)
        return pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="requests each client sends back to back")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8)
    options = parser.parse_args()
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"  # read by both servers' engines: one core for the edges
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(build_tiny_model(root / "tiny"), root / "model")
        ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512).write(root / "model")
        pairs = measure(root, options)
    ratios = [round(p["ours"]["requests_per_s"] / p["vllm_serve"]["requests_per_s"], 2) for p in pairs]
    print(f"\nclients={options.clients} rounds={options.rounds} new_tokens={options.new_tokens}, tiny model, "
          f"engine on one core")
    for side in ("ours", "vllm_serve"):
        figures = {key: round(statistics.median(p[side][key] for p in pairs), 2)
                   for key in ("requests_per_s", "edge_cpu_ms_per_request", "edge_switches_per_request")}
        pings = [p[side]["ping_p99_ms"] for p in pairs]
        print(f"{side:<10} requests/s {figures['requests_per_s']:>6}  edge CPU ms/request "
              f"{figures['edge_cpu_ms_per_request']:>5}  switches/request {figures['edge_switches_per_request']:>5}  "
              f"/ping p99 per run {pings} ms (medians of {len(pairs)} runs)")
    print(f"ratio per pair (ours / vllm serve requests/s): {ratios}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
