"""Serve's fault policy (serve/faults.py) and admission (serve/admission.py) on the HTTP layer alone: a failure
classified by its exception's type, and the admission an out-of-memory halves climbing back. The same policy
through a real server is tests/contract/test_faults.py."""

from __future__ import annotations

import pytest
import torch

from serve.adapters import Adapters
from serve.admission import Admission
from serve.app import create_app
from serve.custom import CustomHandlers
from serve.errors import Overloaded
from serve.predict import PredictEngine
from serve.schemas import GenerateParams, GenerateRequest
from tests.unit.test_app import post, startup, wait_until

FAULTS = {"oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
          "cuda": torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
          "bug": KeyError("text"),
          "echo": ValueError("cannot parse 'CUDA error: an illegal memory access' (an out of memory story)")}


def predict_fn(data, model):
    if data.get("fault"):
        raise FAULTS[data["fault"]]
    return {"ok": model}


def test_the_fault_policy_a_bug_fails_its_request_oom_halves_admission_a_cuda_error_fails_the_worker(tmp_path):
    """Classified by the exception's type: a predict_fn bug whose message quotes a CUDA error is a bug. The
    admission an out-of-memory halved climbs back as requests succeed."""
    custom = CustomHandlers(tmp_path / "inference.py",
                            {"model_fn": lambda model_dir: "model", "predict_fn": predict_fn})
    start = startup(tmp_path, custom, MAX_CONCURRENT_REQUESTS="8")
    engine = PredictEngine(start.config, start.spec, custom)
    exits = []
    engine.admission = Admission(8, exit_worker=lambda: exits.append(True))
    engine.start()
    client = create_app(engine, Adapters({}), start).test_client()
    wait_until(lambda: client.get("/ping").status_code == 200)
    assert post(client, {}).json == {"ok": "model"}

    bug = post(client, {"fault": "bug"})
    assert bug.status_code == 424 and bug.json["error"] == "predict_fn failed: KeyError: 'text'"
    echo = post(client, {"fault": "echo"})
    assert echo.status_code == 424 and engine.capacity == 8 and client.get("/ping").status_code == 200
    oom = post(client, {"fault": "oom"})
    assert oom.status_code == 503 and oom.json["error_type"] == "out_of_memory"
    assert engine.capacity == 4 and client.get("/ping").status_code == 200
    assert post(client, {}).json == {"ok": "model"}  # only the request that caused it failed
    for _ in range(3):  # 4 successes at a limit of 4: one more slot (an eighth of the start's 8)
        assert post(client, {}).status_code == 200
    assert engine.capacity == 5

    cuda = post(client, {"fault": "cuda"})
    assert cuda.status_code == 500 and cuda.json["error_type"] == "engine"
    assert "illegal memory access" in cuda.json["error"]
    assert client.get("/ping").status_code == 500  # at once; the worker exits a second later
    refused = post(client, {})
    assert refused.status_code == 500 and "this worker restarts" in refused.json["error"]
    wait_until(lambda: exits == [True])


def test_admission_halved_by_an_out_of_memory_climbs_back_as_requests_succeed():
    admission = Admission(8, exit_worker=lambda: None)
    request = GenerateRequest("hi", GenerateParams())
    tickets = [admission.ticket(request) for _ in range(8)]
    admission.fault(torch.OutOfMemoryError("CUDA out of memory"), "generation")
    assert admission.admitted == 8
    for ticket in tickets:  # all eight were in flight: four of their slots are kept back as they return
        ticket.emit("error", RuntimeError("failed"))
    assert admission.admitted == 0  # none in flight, whatever the slots kept back
    held = [admission.ticket(request) for _ in range(4)]
    assert admission.admitted == 4
    with pytest.raises(Overloaded):
        admission.ticket(request)
    for ticket in held:  # four successes in a row at a limit of four: an eighth of the start's 8 comes back
        ticket.emit("done", None)
    assert admission.limit == 5
    held = [admission.ticket(request) for _ in range(5)]
    with pytest.raises(Overloaded):
        admission.ticket(request)
    for _ in range(6):
        for ticket in held:
            ticket.emit("done", None)
        held = [admission.ticket(request) for _ in range(admission.limit)]
    assert admission.limit == 8  # never above the start's
    with pytest.raises(Overloaded):
        admission.ticket(request)
    assert admission.admitted == 8  # a refusal takes no slot


def test_a_stopping_worker_answers_the_requests_still_running_and_refuses_new_ones():
    from serve.admission import Ticket
    from serve.errors import Unavailable

    admission = Admission(4, exit_worker=lambda: None)
    ticket = admission.ticket(GenerateRequest("Hi", GenerateParams()))
    admission.track(ticket)
    admission.stop("the server is stopping")
    with pytest.raises(Unavailable, match="the server is stopping"):
        ticket.result(timeout=30)
    assert admission.admitted == 0  # its slot is free
    with pytest.raises(Unavailable) as refused:
        admission.ticket(GenerateRequest("Hi", GenerateParams()))
    assert refused.value.status == 503 and isinstance(ticket, Ticket)
    between = Admission(4, exit_worker=lambda: None)  # admitted, then the stop, then tracked: answered too
    late = between.ticket(GenerateRequest("Hi", GenerateParams()))
    between.stop("the server is stopping")
    between.track(late)
    with pytest.raises(Unavailable):
        late.result(timeout=30)
