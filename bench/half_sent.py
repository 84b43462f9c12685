"""/ping while 200 clients hold half-sent requests: gunicorn's stock gthread worker and serve/worker.py's, in one run.

    .venv/bin/python bench/half_sent.py [--held 200] [--pings 200] [--workers gthread,buffering] [--model-dir DIR]
    .venv/bin/python bench/half_sent.py --url URL          (a server already running: its own worker only)

Each worker runs the real `serve` (gunicorn in-process, the Flask app, MAX_CONCURRENT_REQUESTS + 4 threads), by
default on a predict_fn model (code/inference.py, no vLLM: the server starts in seconds, and /ping measures the HTTP
edge alone), or on a model folder with vLLM (--model-dir). For each worker: /ping's latency over --pings sequential
pings, each on a new connection, with nothing held (the baseline), then again with --held connections open, half of
them having sent one byte and half half a header block; and the ratio of the two p99s. A ping with no answer within
2 s (SageMaker's health check timeout) is lost; after 5 lost in a row the worker is starved and its run stops.

Prints one line per worker, and exits 1 when serve/worker.py's p99 while the connections are held is over 100 ms
(--p99-ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from local_test.harness import HALF_HEAD, ONE_BYTE, free_port, still_open  # noqa: E402

WORKERS = {"gthread": "gthread", "buffering": "serve.worker.BufferingWorker"}
PING_TIMEOUT = 2.0
LOST_IN_A_ROW = 5
P99_LIMIT_MS = 100.0
PREDICT_FN = '''
def model_fn(model_dir):
    return {}


def predict_fn(data, model, context):
    return {"echo": data}
'''


def serve_with(worker: str) -> None:
    """The bench's server: `serve` itself, with gunicorn's worker class replaced by `worker`."""
    from serve.server import Server
    from serve.startup import prepare

    server = Server(prepare())
    server.cfg.set("worker_class", WORKERS[worker])
    server.run()


def start(worker: str, root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, __file__, "--serve-with", worker], cwd=REPO,
                               env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(port)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url + "/ping", timeout=PING_TIMEOUT).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"serve with the {worker} worker did not become ready")


def pings(url: str, count: int) -> list[float]:
    """Seconds per ping, each on a new connection; a lost ping is inf. Stops after LOST_IN_A_ROW lost."""
    seconds: list[float] = []
    while len(seconds) < count and seconds[-LOST_IN_A_ROW:] != [float("inf")] * LOST_IN_A_ROW:
        began = time.perf_counter()
        try:
            ok = requests.get(url + "/ping", timeout=PING_TIMEOUT).status_code == 200
        except requests.RequestException:
            ok = False
        seconds.append(time.perf_counter() - began if ok else float("inf"))
    return seconds


def hold(url: str, count: int) -> list[socket.socket]:
    address = urlsplit(url)
    held = []
    for i in range(count):
        held.append(socket.create_connection((address.hostname, address.port), timeout=10))
        held[-1].sendall(ONE_BYTE if i % 2 else HALF_HEAD)
    return held


def percentile(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summary(seconds: list[float]) -> str:
    answered = sum(s != float("inf") for s in seconds)
    p50, p99 = (f"{percentile(seconds, q):.1f} ms".replace("inf ms", "lost") for q in (0.50, 0.99))
    return f"{answered}/{len(seconds)} answered, p50 {p50}, p99 {p99}"


def measure(name: str, url: str, held_count: int, ping_count: int) -> float:
    """Prints the worker's line; returns its p99 in ms while the connections are held (inf: lost pings)."""
    baseline = pings(url, ping_count)
    held = hold(url, held_count)
    try:
        time.sleep(0.5)  # the server has read their bytes
        loaded = pings(url, ping_count)
        still = sum(map(still_open, held))
    finally:
        for sock in held:
            sock.close()
    ratio = percentile(loaded, 0.99) / percentile(baseline, 0.99)
    starved = " (starved: stopped)" if len(loaded) < ping_count else ""
    print(f"{name:10s} baseline: {summary(baseline)} | {held_count} held: {summary(loaded)}{starved} | "
          f"p99 ratio {ratio:.2f} | held still open at the end: {still}/{held_count}", flush=True)
    return percentile(loaded, 0.99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, default=200)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--workers", default="gthread,buffering", help=f"of {', '.join(WORKERS)}")
    parser.add_argument("--model-dir", type=Path, help="a model folder to serve with vLLM (default: a predict_fn)")
    parser.add_argument("--url", help="measure this running server instead of starting one per worker")
    parser.add_argument("--p99-ms", type=float, default=P99_LIMIT_MS)
    parser.add_argument("--serve-with", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_with:
        serve_with(args.serve_with)
        return 0
    if args.url:
        return int(measure("url", args.url, args.held, args.pings) > args.p99_ms)
    root = Path(tempfile.mkdtemp(prefix="half-sent-"))
    if args.model_dir:
        shutil.copytree(args.model_dir, root / "model")
    else:
        (root / "model" / "code").mkdir(parents=True)
        (root / "model" / "code" / "inference.py").write_text(PREDICT_FN)
    failed = False
    try:
        for worker in args.workers.split(","):
            process, url = start(worker, root)
            try:
                p99 = measure(worker, url, args.held, args.pings)
                failed |= worker == "buffering" and p99 > args.p99_ms
            finally:
                process.terminate()
                process.wait(timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
