import sys

import pytest

from container.opt_ml import ContractError
from train.config import TrainConfig
from train.launcher import Topology, launch_env, resolve, torchrun_command

CONFIG = TrainConfig(master_port=7777)


def topo(hosts, current, per_host, instance_type="ml.g5.48xlarge", interface="eth0"):
    return Topology(tuple(hosts), current, per_host, interface, instance_type)


def test_one_process_on_one_host_needs_no_launcher():
    assert not topo(["algo-1"], "algo-1", 1).needs_launcher


def test_one_host_eight_gpus():
    top = topo(["algo-1"], "algo-1", 8)
    assert top.needs_launcher and top.world_size == 8
    assert torchrun_command(top, CONFIG, "127.0.0.1") == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "8", "--max_restarts", "0",
        "--shutdown_timeout", "110", "--master_addr", "127.0.0.1", "--master_port", "7777", "-m", "train"]


def test_two_hosts_eight_gpus_second_host():
    top = topo(["algo-1", "algo-2"], "algo-2", 8)
    assert top.world_size == 16 and top.node_rank == 1
    assert torchrun_command(top, CONFIG, "10.0.0.5") == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8", "--max_restarts", "0",
        "--shutdown_timeout", "110", "--node_rank", "1", "--master_addr", "10.0.0.5", "--master_port", "7777",
        "-m", "train"]


@pytest.mark.parametrize("instance_type,efa", [("ml.p4d.24xlarge", True), ("ml.p5.48xlarge", True),
                                               ("ml.g5.48xlarge", False)])
def test_network_settings_with_and_without_efa(instance_type, efa):
    env = launch_env(topo(["algo-1", "algo-2"], "algo-1", 8, instance_type, interface="eth1"))
    assert env["NCCL_SOCKET_IFNAME"] == "eth1" and env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["LLM_TWIN_WORKER"] == "1"
    assert (env.get("FI_PROVIDER"), env.get("FI_EFA_USE_DEVICE_RDMA")) == (("efa", "1") if efa else (None, None))


def test_first_host_is_resolved_with_retries_then_a_clear_error():
    assert resolve("localhost", timeout=1) == "127.0.0.1"
    with pytest.raises(ContractError, match="cannot resolve the first instance 'algo-404.invalid' after 0 s"):
        resolve("algo-404.invalid", timeout=0)


def test_qlora_cannot_be_sharded():
    from container.config import ConfigError

    with pytest.raises(ConfigError, match="adapter=qlora with distributed=zero3 is not supported"):
        TrainConfig(adapter="qlora", distributed="zero3")


def test_gpu_count_prefers_sagemakers_figure():
    from train.launcher import gpu_count

    assert gpu_count({"SM_NUM_GPUS": "8"}) == 8
    import torch

    assert gpu_count({}) == torch.cuda.device_count()



WORKERS = """
import json, os, pathlib, signal, sys, time
folder, rank = os.environ["LLM_TWIN_RANK_FAILURES"], os.environ.get("RANK", "0")
def report(code, message):
    with open(os.path.join(folder, "rank-" + rank), "w") as f:
        json.dump({"time": time.time(), "code": code, "message": message}, f)
    sys.exit(1)  # torchrun exits 1 whatever its workers' codes
signal.signal(signal.SIGTERM, lambda *a: report(143, "training stopped by SIGTERM during sft at step 3"))
pathlib.Path(sys.argv[2]).touch()  # started, and listening for SIGTERM
if sys.argv[1] == "fail":
    report(1, "training failed: RuntimeError: CUDA error: an illegal memory access")
time.sleep(30)
"""


@pytest.mark.parametrize("mode, code, first_line", [
    ("fail", 1, "rank 0 on host algo-1 failed: training failed: RuntimeError: CUDA error"),
    ("running", 143, "rank 0 on host algo-1 failed: training stopped by SIGTERM during sft at step 3"),
    ("starting", 143, "training stopped by SIGTERM before its processes started"),
])
def test_the_launcher_passes_sigterm_on_from_its_start_and_reads_typed_reports(tmp_path, monkeypatch, mode, code,
                                                                              first_line):
    """A SIGTERM while the workers run reaches them (they checkpoint and report 143); one that lands before
    torchrun is started starts nothing; a real failure keeps its code. torchrun exits 1 in every case."""
    import os
    import signal
    import subprocess
    import threading
    import time

    import train.launcher as launcher

    script, started = tmp_path / "workers.py", tmp_path / "started"
    script.write_text(WORKERS)
    monkeypatch.setattr(launcher, "torchrun_command",
                        lambda top, config, master: [sys.executable, str(script), mode, str(started)])
    popen, environment = subprocess.Popen, launcher.launch_env

    def spot_notice_then_environment(top):  # between the launcher's handler and torchrun's start
        if mode == "starting":
            os.kill(os.getpid(), signal.SIGTERM)
        return environment(top)

    def spot_notice_then_popen(*args, **kwargs):
        if mode == "running":
            def notice():
                while not started.exists():
                    time.sleep(0.05)
                # The kernel hands a process's SIGTERM to any of its threads: here to this one, not the main
                # thread, which is blocked waiting for torchrun (what a loaded machine did, now and then).
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            threading.Thread(target=notice, daemon=True).start()
        return popen(*args, **kwargs)

    monkeypatch.setattr(launcher.subprocess, "Popen", spot_notice_then_popen)
    monkeypatch.setattr(launcher, "launch_env", spot_notice_then_environment)
    previous = signal.getsignal(signal.SIGTERM)
    begun = time.monotonic()
    result = launcher.launch(CONFIG, topo(["algo-1"], "algo-1", 2))
    assert time.monotonic() - begun < 20  # a running worker was told, not left to sleep
    assert result[0] == code and result[1][0].startswith(first_line), result
    assert started.exists() == (mode != "starting")
    assert signal.getsignal(signal.SIGTERM) == previous  # the launcher forwards only while torchrun runs
