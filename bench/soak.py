"""Soak: the real server under sustained mixed traffic, watched for errors, latency of /ping and leaks.

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 32] [--model-dir DIR]   (make soak)
    .venv/bin/python bench/soak.py --seconds 20 --ping-p99-ms 1000 --url URL --pid PID
                                 (the short run in make test, against the suite's shared server)

`serve` runs as SageMaker runs it (gunicorn, vLLM), on the tiny model by default (--model-dir: any model
folder, e.g. the embedded SmolLM2), or is one already running (--url, and --pid to measure its processes).
The clients loop over a mix: TGI requests plain and streamed, chat plain and streamed, streams the client
drops after a few tokens, bodies that are not JSON, bodies over 6 MiB, and jsonlines batches. Each answer
is checked against what that kind must get (200 with the right shape, or the right 4xx). A pinger asks
/ping every 100 ms. The server's process tree is measured after a warm-up and at the end: resident memory,
open file descriptors, threads.

Prints the counts by kind, and exits 1 when a check fails: a 5xx or a wrong answer, /ping p99 over
100 ms (--ping-p99-ms; the scenario suite's short run allows 12000 on a loaded 2-core machine), resident memory
grown by more than 10% + 64 MiB, file descriptors or threads grown by more than 16 (a leak per request
would grow them by thousands).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from container.model_dir import ServingSpec  # noqa: E402
from local_test.harness import free_port, process_tree  # noqa: E402
from local_test.tiny_model import build_tiny_model  # noqa: E402

SERVE = Path(sys.executable).parent / "serve"
MIX = {"tgi": 25, "tgi_stream": 20, "chat": 15, "chat_stream": 10, "dropped_stream": 10, "bad_body": 8,
       "jsonlines": 8, "oversize": 4}
PING_P99_LIMIT_MS = 100
MEMORY_GROWTH = (1.10, 64 * 2**20)  # end <= start * 1.10 + 64 MiB
HANDLE_GROWTH = 16


def measure(pid: int) -> dict:
    """Resident memory, open descriptors and threads of the server's whole process tree."""
    totals = Counter()
    for p in process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            totals["rss"] += int(fields["VmRSS"].split()[0]) * 1024
            totals["threads"] += int(fields["Threads"])
            totals["fds"] += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            continue  # a process that ended while being measured
    return dict(totals)


def one_request(url: str, kind: str, rng: random.Random) -> str:
    """Send one request of `kind`; return "ok", or what was wrong."""
    tokens = rng.randint(4, 24)
    prompt = f"Write about lesson {rng.randint(1, 99)}"
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
    if kind == "tgi":
        r = requests.post(url, json={"inputs": prompt, "parameters": {"max_new_tokens": tokens}}, timeout=60)
        return "ok" if r.status_code == 200 and "generated_text" in r.json()[0] else f"{r.status_code} {r.text[:80]}"
    if kind == "chat":
        r = requests.post(url, json=chat, timeout=60)
        return "ok" if r.status_code == 200 and r.json()["choices"][0]["message"] else f"{r.status_code} {r.text[:80]}"
    if kind in ("tgi_stream", "chat_stream", "dropped_stream"):
        body = {**chat, "stream": True} if kind == "chat_stream" else \
            {"inputs": prompt, "parameters": {"max_new_tokens": 200 if kind == "dropped_stream" else tokens},
             "stream": True}
        with requests.post(url, json=body, timeout=60, stream=True) as r:
            if r.status_code != 200:
                return f"{r.status_code} {r.text[:80]}"
            events = [line for line in r.iter_lines() if line.startswith(b"data:")] if kind != "dropped_stream" else []
            if kind == "dropped_stream":
                first = b""
                for number, line in enumerate(r.iter_lines()):
                    first = first or line
                    if number >= 3:
                        break  # the client leaves: closing the response drops the connection
                return "ok" if first.startswith(b"data:") else f"stream began with {first[:80]!r}"
        last = events[-1][5:].strip() if events else b""
        if kind == "chat_stream":
            return "ok" if last == b"[DONE]" else f"stream ended with {last[:80]!r}"
        return ("ok" if last and json.loads(last).get("generated_text") is not None
                else f"stream ended with {last[:80]!r}")
    if kind == "bad_body":
        r = requests.post(url, data=b'{"inputs": "unterminated', headers={"Content-Type": "application/json"},
                          timeout=60)
        return ("ok" if r.status_code == 400 and r.json()["error_type"] == "bad_request"
                else f"{r.status_code} {r.text[:80]}")
    if kind == "oversize":
        r = requests.post(url, data=b"x" * (7 * 2**20), headers={"Content-Type": "application/json"}, timeout=60)
        return "ok" if r.status_code == 413 else f"{r.status_code} {r.text[:80]}"
    if kind == "jsonlines":
        lines = [json.dumps({"inputs": f"{prompt} part {i}", "parameters": {"max_new_tokens": tokens}})
                 for i in range(3)]
        r = requests.post(url, data="\n".join(lines) + "\n", headers={"Content-Type": "application/jsonlines"},
                          timeout=60)
        answers = r.text.strip().splitlines()
        good = r.status_code == 200 and len(answers) == 3 and all("generated_text" in json.loads(a) for a in answers)
        return "ok" if good else f"{r.status_code} {r.text[:80]}"
    raise ValueError(kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes (the short CI run)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model-dir", type=Path, help="a model folder to serve (default: the tiny model)")
    parser.add_argument("--url", help="soak this running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process, whose tree is measured")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ping-p99-ms", type=float, default=PING_P99_LIMIT_MS,
                        help=f"the /ping p99 allowed (default {PING_P99_LIMIT_MS}; SageMaker's own limit is 2000)")
    args = parser.parse_args()
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid: the server's process tree is measured for leaks")
        return soak(args.url, args.pid, duration, args.clients, args.seed, args.ping_p99_ms)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    model = work / "model"
    if args.model_dir:
        shutil.copytree(args.model_dir, model)
    else:
        build_tiny_model(model)
        ServingSpec(base_model="tiny", max_input_tokens=400, max_total_tokens=512, max_new_tokens=16).write(model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(SERVE)], env={**os.environ, "SAGEMAKER_BASE_DIR": str(work),
                                                 "SAGEMAKER_BIND_TO_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_lines: list[str] = []
    threading.Thread(target=lambda: log_lines.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None:
                print("".join(log_lines[-40:]))
                print(f"serve exited with {server.returncode}")
                return 1
            time.sleep(0.2)
        return soak(url, server.pid, duration, args.clients, args.seed, args.ping_p99_ms)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


def soak(url: str, pid: int, duration: float, clients: int, seed: int, ping_limit_ms: float) -> int:
    counts: Counter = Counter()
    wrong: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    pings: list[float] = []
    kinds, weights = list(MIX), list(MIX.values())

    def client(number: int):
        rng = random.Random(seed * 1000 + number)
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            try:
                outcome = one_request(url + "/invocations", kind, rng)
            except Exception as e:  # a client must never die silently: whatever broke is counted as wrong
                outcome = f"{type(e).__name__}: {e}"[:120]
            with lock:
                counts[kind] += 1
                if outcome != "ok":
                    wrong[f"{kind}: {outcome}"] += 1

    ping_timeout = max(5.0, 3 * ping_limit_ms / 1000)  # a ping slower than this is a failed one

    def pinger():
        while not stop.is_set():
            begun = time.monotonic()
            try:
                code = requests.get(url + "/ping", timeout=ping_timeout).status_code
                pings.append((time.monotonic() - begun) * 1000 if code == 200 else float("inf"))
            except requests.RequestException:
                pings.append(float("inf"))
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    threads.append(threading.Thread(target=pinger, daemon=True))
    for thread in threads:
        thread.start()
    warm = min(10.0, duration / 4)
    time.sleep(warm)  # the engine's first batches and caches settle before the baseline is taken
    start = measure(pid)
    pings.clear()
    time.sleep(max(0.0, duration - warm))
    end = measure(pid)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)

    served = sum(counts.values())
    failed_pings = sum(1 for p in pings if p == float("inf"))
    ordered = sorted(pings)
    p99 = ordered[int(0.99 * (len(ordered) - 1))] if ordered else float("inf")
    print(f"soak: {duration:.0f} s, {clients} clients: {served} requests ({served / duration:.1f}/s), "
          f"{sum(wrong.values())} wrong, /ping p99 {p99:.1f} ms over {len(ordered)} pings")
    print("  by kind: " + ", ".join(f"{kind} {counts[kind]}" for kind in kinds))
    print(f"  resident memory {start['rss'] / 2**20:.0f} -> {end['rss'] / 2**20:.0f} MiB, open files {start['fds']} -> "
          f"{end['fds']}, threads {start['threads']} -> {end['threads']}")
    problems = [f"{n} x {what}" for what, n in wrong.most_common(10)]
    if failed_pings:
        problems.append(f"{failed_pings} /ping requests were not answered 200 within {ping_timeout:g} s")
    if p99 > ping_limit_ms:
        problems.append(f"/ping p99 {p99:.1f} ms is over {ping_limit_ms:g} ms")
    if end["rss"] > start["rss"] * MEMORY_GROWTH[0] + MEMORY_GROWTH[1]:
        problems.append(f"resident memory grew from {start['rss'] / 2**20:.0f} to {end['rss'] / 2**20:.0f} MiB")
    for name in ("fds", "threads"):
        if end[name] > start[name] + HANDLE_GROWTH:
            problems.append(f"{name} grew from {start[name]} to {end[name]}")
    for problem in problems:
        print(f"  FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
