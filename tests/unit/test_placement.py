from collections import namedtuple

import pytest

from container.config import ConfigError
from serve.placement import Placement, free_gpu, plan
from serve.startup import check_shared_memory

GIB = 2**30


@pytest.mark.parametrize("requested,gpus,gpu_gib,model_gib,expected", [
    (0, 0, 0, 0.3, Placement(1, False, False)),  # CPU: one worker, threads for I/O
    (0, 1, 24, 16, Placement(1, False, False)),  # 8B bf16 on one A10G
    (0, 4, 24, 16, Placement(4, True, False)),  # g5.12xlarge: a copy per GPU
    (0, 4, 24, 28, Placement(1, False, True)),  # too big for one GPU: one worker across all four
    (0, 8, 80, 140, Placement(1, False, True)),  # 70B on p4de
    (2, 4, 24, 16, Placement(2, True, False)),  # SAGEMAKER_MODEL_SERVER_WORKERS wins
    (0, 4, 24, None, Placement(1, False, True)),  # an adapter on a hub base of unknown size: the safe choice
])
def test_one_worker_per_model_copy(requested, gpus, gpu_gib, model_gib, expected):
    size = None if model_gib is None else int(model_gib * GIB)
    assert plan(requested, gpus, int(gpu_gib * GIB), size) == expected


@pytest.mark.parametrize("requested,gpus,model_gib,message", [
    (8, 4, 16, "SAGEMAKER_MODEL_SERVER_WORKERS=8 is more workers than the GPUs hold: the model fits one GPU, so one "
               "worker per GPU \\(4\\); .* use at most 4"),
    (2, 4, 28, "the model spans all 4 GPUs .* use at most 1"),
    (2, 1, 16, "one worker per GPU \\(1\\)"),
])
def test_more_workers_than_the_gpus_hold_is_refused_not_stacked_on_gpu_0(requested, gpus, model_gib, message):
    with pytest.raises(ConfigError, match=message):
        plan(requested, gpus, 24 * GIB, int(model_gib * GIB))


def test_a_restarted_worker_takes_the_free_gpu():
    assert free_gpu(set(), 4) == 0
    assert free_gpu({0, 1, 3}, 4) == 2


def test_too_little_shared_memory_for_vllm_is_refused_with_the_fix(monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(64 * 2**20, 2 * 2**20, 62 * 2**20))
    with pytest.raises(ConfigError,
                       match=r"/dev/shm has 62 MiB free; .* --shm-size=1g \(docker run's default is 64 MiB\)"):
        check_shared_memory()
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(2**30, 0, 2**30))
    check_shared_memory()  # 1 GiB: enough


def test_num_shard_runs_one_engine_over_gpus_the_host_has():
    from serve.placement import sharded

    assert sharded(4, 0, gpus=4) == Placement(1, pin_gpus=False, span_gpus=False)
    with pytest.raises(ConfigError, match="NUM_SHARD=2 shards the model over 2 GPUs, and this host has 0"):
        sharded(2, 0, gpus=0)
    with pytest.raises(ConfigError, match="would start 2 of them on the same GPUs"):
        sharded(2, 2, gpus=4)
