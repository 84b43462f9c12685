"""Multi-process and multi-instance launch, driven by resourceconfig.json.

Every instance runs the same `train`. When the job has more than one instance or more than one process
per instance, `train` becomes a launcher: it starts `torchrun` with this instance's rank and the first
instance as rendezvous (static, over TCP: no SSH, the same wiring DeepSpeed's `standard` multi-node
launcher uses), waits, and turns the workers' failures into this instance's failure file.

    1 instance x 1 GPU    no launcher: training runs in this process
    1 x 8                 torchrun --nnodes 1 --nproc_per_node 8 ...
    2 x 8                 torchrun --nnodes 2 --node_rank <index of current_host> --nproc_per_node 8
                                   --master_addr <first host, resolved> --master_port 7777 ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from container.opt_ml import ContractError, OptML
from train.config import TrainConfig
from train.errors import EXIT_INTERRUPTED

SHUTDOWN_TIMEOUT = 110  # after SIGTERM, workers get this long to checkpoint (SageMaker kills at 120 s)
WORKER_ENV = "LLM_TWIN_WORKER"  # set in workers, so they train instead of launching again
RANK_FAILURES_ENV = "LLM_TWIN_RANK_FAILURES"  # folder where each failing rank leaves its message
BASE_REVISION_ENV = "LLM_TWIN_BASE_REVISION"  # a hub base's commit, resolved once by the launcher for its workers
# Instance types with Elastic Fabric Adapter networking (NCCL over libfabric's EFA provider).
EFA_INSTANCE_TYPES = ("ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge", "ml.p5e.48xlarge", "ml.p5en.48xlarge",
                      "ml.p6-b200.48xlarge", "ml.trn1.32xlarge", "ml.trn1n.32xlarge")


@dataclass(frozen=True)
class Topology:
    hosts: tuple[str, ...]
    current_host: str
    processes_per_host: int
    network_interface: str | None
    instance_type: str | None

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.processes_per_host

    @property
    def needs_launcher(self) -> bool:
        return self.world_size > 1


def topology(config: TrainConfig, paths: OptML, environ: Mapping[str, str] = os.environ) -> Topology:
    resources = paths.read_resource_config()
    raw = json.loads(paths.resource_config_file.read_text()) if paths.resource_config_file.is_file() else {}
    per_host = config.processes_per_host or max(1, gpu_count(environ))
    return Topology(resources.hosts, resources.current_host, per_host, resources.network_interface_name,
                    raw.get("current_instance_type") or environ.get("SM_CURRENT_INSTANCE_TYPE"))


def gpu_count(environ: Mapping[str, str] = os.environ) -> int:
    """SM_NUM_GPUS when SageMaker sets it, else the devices torch sees (honouring CUDA_VISIBLE_DEVICES).
    The workers are separate processes started by torchrun, so this process touching CUDA is harmless."""
    if environ.get("SM_NUM_GPUS", "").isdigit():
        return int(environ["SM_NUM_GPUS"])
    import torch

    return torch.cuda.device_count()


def torchrun_command(top: Topology, config: TrainConfig, master_addr: str) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(top.hosts)),
               "--nproc_per_node", str(top.processes_per_host), "--max_restarts", "0",
               "--shutdown_timeout", str(SHUTDOWN_TIMEOUT)]
    if len(top.hosts) > 1:
        command += ["--node_rank", str(top.node_rank), "--master_addr", master_addr,
                    "--master_port", str(config.master_port)]
    else:
        command += ["--master_addr", "127.0.0.1", "--master_port", str(config.master_port)]
    return command + ["-m", "train"]


def launch_env(top: Topology) -> dict[str, str]:
    env = {WORKER_ENV: "1"}
    if top.network_interface:
        env["NCCL_SOCKET_IFNAME"] = top.network_interface
        env["GLOO_SOCKET_IFNAME"] = top.network_interface
    if top.instance_type in EFA_INSTANCE_TYPES or Path("/dev/infiniband/uverbs0").exists():
        env.update(FI_PROVIDER="efa", FI_EFA_USE_DEVICE_RDMA="1")
    return env


def resolve(host: str, timeout: float) -> str:
    """The first host's address, retried: SageMaker's DNS entries for peers can appear late."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.gethostbyname(host)
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ContractError(f"cannot resolve the first instance {host!r} after {timeout:.0f} s: {e}") from e
            time.sleep(2)


def launch(config: TrainConfig, top: Topology, base_revision: str | None = None) -> tuple[int, tuple[str, str] | None]:
    """Run the workers; return their exit code and, on failure, (first line, details) for the failure file.
    `base_revision`: the hub base's commit this launcher resolved, which the workers load (not resolved again).
    A SIGTERM (spot) is passed on to torchrun, which passes it to every worker: they checkpoint and stop.
    The exit code is EXIT_INTERRUPTED when this launcher was signalled or every failing rank reported an
    interruption (torchrun itself exits 1 for any failure)."""
    master = resolve(top.hosts[0], config.dns_timeout) if len(top.hosts) > 1 else "127.0.0.1"
    failures = Path(tempfile.mkdtemp(prefix="rank-failures-"))
    command = torchrun_command(top, config, master)
    print(f"launcher: host {top.current_host} (rank {top.node_rank} of {len(top.hosts)}), "
          f"{top.processes_per_host} process(es) here, world size {top.world_size}: {' '.join(command)}", flush=True)
    signalled, process = False, None

    def forward(signum, frame):
        nonlocal signalled
        signalled = True
        # Said by the process SageMaker signals: a SIGTERM that stops here leaves a trace in the job's log
        print("launcher: SIGTERM received: passing it on to torchrun, which stops the training processes",
              flush=True)
        if process is not None:
            process.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)  # before torchrun exists: a SIGTERM in between is kept
    try:
        environment = {**os.environ, **launch_env(top), RANK_FAILURES_ENV: str(failures)}
        if base_revision:
            environment[BASE_REVISION_ENV] = base_revision
        if signalled:  # nothing started yet: nothing to stop
            shutil.rmtree(failures, ignore_errors=True)
            return EXIT_INTERRUPTED, ("training stopped by SIGTERM before its processes started; start the job "
                                      "again to resume", "")
        process = subprocess.Popen(command, env=environment)
        if signalled:  # it came while torchrun was being started
            process.send_signal(signal.SIGTERM)
        code = _wait_handling_signals(process)
    finally:
        signal.signal(signal.SIGTERM, previous)
    reports = read_rank_failures(failures)
    shutil.rmtree(failures, ignore_errors=True)
    if code == 0:
        return 0, None
    # Stopped, not failed (as a single-process job reports it): this launcher was signalled, or every rank
    # here says so. A rank killed outright (the OOM killer) writes nothing, and its peers, stopped by
    # torchrun, report 143: that is a failure.
    every_rank = len(reports) == top.processes_per_host
    if signalled or (every_rank and all(report[2] == EXIT_INTERRUPTED for report in reports)):
        code = EXIT_INTERRUPTED
    return code, failure_summary(reports, top, code)


def _wait_handling_signals(process: subprocess.Popen) -> int:
    """process.wait(), in short steps. Python runs a signal's handler in the main thread only, and when the
    kernel hands SIGTERM to another thread of this process, a main thread blocked in waitpid() is not woken:
    the forward would wait until torchrun exits on its own. Waiting with a timeout keeps it running."""
    while True:
        try:
            return process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            continue


def write_rank_failure(message: str, code: int, environ: Mapping[str, str] = os.environ) -> None:
    """Called by a failing worker: leave its message and exit code for this host's launcher, written whole
    (a temporary file renamed into place), so a rank killed mid-write leaves nothing half-read."""
    folder = environ.get(RANK_FAILURES_ENV)
    if folder:
        rank = environ.get("RANK", "0")
        partial = Path(folder, f".rank-{rank}.tmp")
        partial.write_text(json.dumps({"time": time.time(), "code": code, "message": message}), encoding="utf-8")
        partial.replace(Path(folder, f"rank-{rank}"))


def read_rank_failures(folder: Path) -> list[tuple[float, int, int, str]]:
    """(time, rank, exit code, message) of every rank that reported, earliest first."""
    reports = []
    for path in folder.glob("rank-*"):
        report = json.loads(path.read_text(encoding="utf-8"))
        reports.append((report["time"], int(path.name.split("-")[1]), report["code"], report["message"].strip()))
    return sorted(reports)


def failure_summary(reports: list[tuple[float, int, int, str]], top: Topology, code: int) -> tuple[str, str]:
    """The earliest failing rank first: it is the likeliest cause, the others often fail because of it."""
    if not reports:
        return (f"training worker exited with code {code} on host {top.current_host} without a report "
                "(killed, e.g. out of memory, or a peer instance failed first: check its failure file)", "")
    _, rank, _, message = reports[0]
    first = f"rank {rank} on host {top.current_host} failed: {message.splitlines()[0]}"
    details = "\n".join(f"rank {r}: {m}" for _, r, _, m in reports)
    return first, details
