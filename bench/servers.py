"""The two servers the serving benches compare: ours (`serve`) and vLLM's own OpenAI server (`vllm serve`)
given the engine arguments ours logged; started, stopped, paused (SIGSTOP) and counted (CPU, thread switches)
through /proc. bench/serve_throughput.py and bench/edge_only.py use them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from local_test.harness import free_port, process_tree

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REQUEST_TIMEOUT = 1800  # the naive server answers 32 clients one at a time: minutes on a busy machine
ARGUMENTS_LOG = "starting vLLM: "  # serve/engine.py logs the engine arguments after this


def start(command: list[str], env: dict, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    return process, round(time.perf_counter() - started, 1)
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{command[:3]} did not become ready: see the end of {log}:\n{log.read_text()[-3000:]}")
    except BaseException:  # that, or SIGTERM while it starts (both_servers): not left behind
        stop(process)
        raise


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, 15)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    except ProcessLookupError:
        pass


def only(sides: dict[str, tuple[str, int]], running: str | None) -> None:
    """Stop (SIGSTOP) every process of the servers but `running`, and let that one go on; None: all go on.
    An idle vLLM model worker polls for work (a tenth of a core), on the cores the measured engine needs. A
    side is its edge's process group: our gunicorn worker's holds its vLLM engine processes (serve/server.py
    post_fork), vllm serve's all of it."""
    for name, (_, pid) in sides.items():
        os.killpg(os.getpgid(pid), signal.SIGCONT if running in (None, name) else signal.SIGSTOP)


def edge_pid(process: subprocess.Popen) -> int:
    """The process that runs the edge: our gunicorn worker, or vllm serve's API server (the process itself)."""
    for pid in process_tree(process.pid):
        if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"gunicorn: worker"):
            return pid
    return process.pid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def thread_switches(pid: int) -> int:
    """How often the process's threads have left a core so far (blocked or preempted). On the CPU, vLLM's
    OpenMP threads spin on every core, so each wake-up of an edge thread takes a core from them a moment."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile (its switches leave with it)
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)
    return total


def engine_arguments(log: Path) -> dict:
    """The arguments our server gave vLLM's engine, from its log."""
    for line in log.read_text().splitlines():
        if ARGUMENTS_LOG in line:
            return json.loads(line.split(ARGUMENTS_LOG, 1)[1])
    raise RuntimeError(f"no {ARGUMENTS_LOG!r} line in {log}")


def vllm_serve_command(arguments: dict, port: int) -> list[str]:
    """`vllm serve` with the same engine arguments, as flags (False: the flag's --no- form)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log"]  # ours writes no access log either
    for name, value in arguments.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append("--no-" + flag[2:])
        elif value is not None:
            command += [flag, str(value)]
    return command


@contextmanager
def both_servers(root: Path):
    """Ours on the model in root/model, then `vllm serve` with the engine arguments ours logged; yields, per
    side, (url, edge pid), with the arguments and each side's start-to-ready seconds; stops both after, also
    when the bench is stopped with SIGTERM (`timeout`), which would otherwise leave both running, or stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally clauses below
    port = free_port()
    environment = {"SAGEMAKER_BASE_DIR": str(root), "SAGEMAKER_BIND_TO_PORT": str(port),
                   "SAGEMAKER_MODEL_SERVER_TIMEOUT": str(REQUEST_TIMEOUT)}  # vllm serve has no deadline either
    ours, ours_start = start([str(BIN / "serve")], environment, port, root / "ours.log")
    try:
        arguments = engine_arguments(root / "ours.log")
        vllm_port = free_port()
        environment = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # as serve/engine_args.py sets for its engine
                       "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
        theirs, theirs_start = start(vllm_serve_command(arguments, vllm_port), environment, vllm_port,
                                     root / "vllm_serve.log")
        sides = {"ours": (f"http://127.0.0.1:{port}", edge_pid(ours)),
                 "vllm_serve": (f"http://127.0.0.1:{vllm_port}", edge_pid(theirs))}
        try:
            yield sides, {"engine_arguments": arguments, "start_s": {"ours": ours_start, "vllm_serve": theirs_start}}
        finally:
            only(sides, None)  # one stopped by only() would not act on SIGTERM
            stop(theirs)
    finally:
        stop(ours)
