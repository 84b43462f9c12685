"""Conversations: what a session's kept KV saves, and what the WebSocket costs against SSE, in one run.

    .venv/bin/python bench/conversations.py [--turns 5] [--repeats 5]

One server (this image's `serve`, the embedded SmolLM2-135M-Instruct, sessions on). Each figure is a median
over --repeats runs.

1. Sessions: a session of --turns turns, each a ~120-word user turn and a 48-token answer; then the last turn's
   whole conversation is sent cold as OpenAI messages, with one word changed at its very start (so no block
   of it is in vLLM's prefix cache) and the same length. Time to first token (streamed) of the session's
   last turn against the cold request: the ratio says what reusing the conversation's KV saved. A session
   keeps the messages, not the KV: vLLM's prefix cache reuses it, as it does for a stateless client that sends
   the whole conversation each turn, which is measured too (its own conversation, warmed by its own turns).
   What a session saves over that client is the resending, not the prefill.
2. Bidirectional streaming: the same TGI request (48 new tokens, greedy), time to first token and to the
   last, over SSE (`/invocations`, stream) and over the WebSocket (`/invocations-bidirectional-stream`, one
   connection kept open as SageMaker keeps it). Target: the WebSocket within 10% of SSE.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from container.model_dir import ServingSpec, embedded_model_dir  # noqa: E402
from local_test.harness import free_port  # noqa: E402
from serve.sessions import NEW_SESSION_HEADER, SESSION_HEADER  # noqa: E402

BIN = Path(sys.executable).parent
JSON = {"Content-Type": "application/json"}
SUBJECTS = ["the cost of a GPU hour", "evaluation sets that drift", "spot instances that vanish",
            "LoRA ranks", "latency budgets", "preference pairs", "tokenizer surprises", "on-call weeks"]
NEW_TOKENS = 48


def user_turn(i: int) -> str:
    subject = SUBJECTS[i % len(SUBJECTS)]
    return (f"Here is my draft about {subject}. " + "We measured it twice, wrote down what changed, and kept the "
            "notes short so the team could read them on a phone between meetings. " * 5 + "Make it sharper.")


def start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(port),
           "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true"}
    process = subprocess.Popen([str(BIN / "serve")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit("the server did not answer /ping within 10 minutes")


def first_token_seconds(url: str, body: dict, headers: dict | None = None) -> tuple[float, str]:
    """Time to the first SSE event carrying text, and the streamed answer's text."""
    started = time.perf_counter()
    first, text = None, []
    with requests.post(url + "/invocations", data=json.dumps(body), headers={**JSON, **(headers or {})},
                       stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            event = json.loads(line[len(b"data:"):])
            piece = (event["choices"][0]["delta"].get("content") if "choices" in event
                     else event.get("token", {}).get("text"))
            if piece and first is None:
                first = time.perf_counter() - started
            text.append(piece or "")
    return first, "".join(text)


def session_versus_cold(url: str, turns: int) -> tuple[float, float, float]:
    """One session of `turns` turns: the last turn's first-token time; the same conversation's sent cold; and a
    stateless client's last turn, which resent its whole conversation each turn."""
    opened = requests.post(url + "/invocations", data=json.dumps({"requestType": "NEW_SESSION"}), headers=JSON,
                           timeout=60)
    session_id = opened.headers[NEW_SESSION_HEADER].split(";")[0]
    nonce = time.time_ns()  # a first message no earlier run sent: this run's prompts are new to the cache
    messages = [{"role": "system", "content": f"Run {nonce}. You help a writer."}]
    for i in range(turns):
        turn = [{"role": "user", "content": user_turn(i)}]
        if i == 0:
            turn = messages + turn
        body = {"messages": turn, "max_tokens": NEW_TOKENS, "stream": True}
        seconds, said = first_token_seconds(url, body, {SESSION_HEADER: session_id})
        messages += [*turn[-1:], {"role": "assistant", "content": said}]
    requests.post(url + "/invocations", data=json.dumps({"requestType": "CLOSE"}),
                  headers={**JSON, SESSION_HEADER: session_id}, timeout=60)
    cold = [{"role": "system", "content": f"Walk {nonce}. You help a writer."}, *messages[1:-1]]
    cold_seconds, _ = first_token_seconds(url, {"messages": cold, "max_tokens": NEW_TOKENS, "stream": True})
    history = [{"role": "system", "content": f"Jump {nonce}. You help a writer."}]
    for i in range(turns):
        history.append({"role": "user", "content": user_turn(i)})
        stateless_seconds, said = first_token_seconds(url, {"messages": history, "max_tokens": NEW_TOKENS,
                                                            "stream": True})
        history.append({"role": "assistant", "content": said})
    return seconds, cold_seconds, stateless_seconds


def websocket_answer(websocket, body: dict) -> tuple[float, float]:
    started = time.perf_counter()
    websocket.send(json.dumps(body))
    first = None
    while True:
        event = json.loads(websocket.recv(timeout=600))
        if "error" in event:  # a failed answer is no fast one
            raise RuntimeError(f"the WebSocket answer failed: {event}")
        if first is None and event.get("token", {}).get("text"):  # the first token with text, as for SSE
            first = time.perf_counter() - started
        if event.get("generated_text") is not None:
            return first, time.perf_counter() - started


def sse_answer(url: str, body: dict) -> tuple[float, float]:
    started = time.perf_counter()
    first, _ = first_token_seconds(url, {**body, "stream": True})
    return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(embedded_model_dir(), root / "model")
        ServingSpec(base_model="embedded", max_input_tokens=3072, max_total_tokens=4096).write(root / "model")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(root, port)
        try:
            pairs = [session_versus_cold(url, options.turns) for _ in range(options.repeats)]
            body = {"inputs": user_turn(0), "parameters": {"max_new_tokens": NEW_TOKENS, "do_sample": False}}
            sse_answer(url, body)  # warm: the prompt's blocks are cached for both transports alike
            with connect(f"ws://127.0.0.1:{port}/invocations-bidirectional-stream", open_timeout=60) as websocket:
                websocket_answer(websocket, body)
                sse, ws = [], []
                for _ in range(options.repeats):  # interleaved, so both see the same machine
                    sse.append(sse_answer(url, body))
                    ws.append(websocket_answer(websocket, body))
        finally:
            server.terminate()
            server.wait(timeout=60)
    session = statistics.median(p[0] for p in pairs)
    cold = statistics.median(p[1] for p in pairs)
    stateless = statistics.median(p[2] for p in pairs)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (2 cores)")
    print(f"\nsession turn {options.turns}, time to first token: {session * 1000:.0f} ms; the same conversation "
          f"cold: {cold * 1000:.0f} ms; ratio cold/session {cold / session:.2f}x  (median of {options.repeats})")
    print(f"a stateless client's turn {options.turns} (the whole conversation resent, its earlier turns cached): "
          f"{stateless * 1000:.0f} ms; ratio stateless/session {stateless / session:.2f}x")
    print("\n| transport | first token (ms) | whole answer (ms) |\n|---|---|---|")
    for name, runs in (("SSE, /invocations", sse), ("WebSocket, /invocations-bidirectional-stream", ws)):
        print(f"| {name} | {statistics.median(r[0] for r in runs) * 1000:.0f} | "
              f"{statistics.median(r[1] for r in runs) * 1000:.0f} |")
    ratio = statistics.median(r[0] for r in ws) / statistics.median(r[0] for r in sse)
    print(f"\nWebSocket/SSE time to first token: {ratio:.2f}x (target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'})")


if __name__ == "__main__":
    main()
