"""Batch transform at SageMaker's limits: the advertised number of concurrent MULTI_RECORD requests, each
at the advertised size, against a server with far fewer admission slots than records (real HTTP)."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import Server

pytestmark = pytest.mark.scenario  # make test-scenarios (CI runs it after make test)

JSONLINES = {"Content-Type": "application/jsonlines"}
RECORD_BYTES = 8 * 1024  # each record padded with JSON whitespace: a 1 MB mini-batch is 127 records


def record(words: int) -> str:
    body = json.dumps({"inputs": "word " * words, "parameters": {"max_new_tokens": 2, "details": True}})
    return body[:-1] + " " * (RECORD_BYTES - len(body)) + "}"


def test_every_record_of_concurrent_full_mini_batches_is_answered_in_order(tiny_served_model):
    server = Server(tiny_served_model, DTYPE="float32", SAGEMAKER_BATCH="true", MAX_CONCURRENT_REQUESTS="8")
    try:
        server.wait_ready()
        parameters = requests.get(server.url + "/execution-parameters", timeout=30).json()
        assert parameters["BatchStrategy"] == "MULTI_RECORD"
        assert parameters["MaxConcurrentTransforms"] * parameters["MaxPayloadInMB"] <= 100
        per_request = parameters["MaxPayloadInMB"] * 2**20 // (RECORD_BYTES + 1)
        words = [[(request + i) % 12 + 1 for i in range(per_request)]
                 for request in range(parameters["MaxConcurrentTransforms"])]
        bodies = ["\n".join(record(w) for w in batch) + "\n" for batch in words]
        bodies[0] = bodies[0].replace(record(words[0][5]), '{"inputs": 5}', 1)  # one invalid record
        assert all(len(body.encode()) <= parameters["MaxPayloadInMB"] * 2**20 for body in bodies)

        with ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda body: server.invoke(body, headers=JSONLINES), bodies))

        input_length = {}  # words -> the prompt's token count: the same for every record with that prompt
        for request, (batch, response) in enumerate(zip(words, responses)):
            assert response.status_code == 200
            answers = [json.loads(line) for line in response.text.splitlines()]
            assert len(answers) == len(batch) > 100
            for number, (count, answer) in enumerate(zip(batch, answers)):
                if (request, number) == (0, 5):
                    assert answer["error_type"] == "validation" and answer["error"].startswith("line 6:")
                    continue
                assert "error" not in answer, answer  # no record refused as overloaded
                assert answer["details"]["generated_tokens"] == 2
                assert (input_length.setdefault(count, answer["details"]["input_length"])
                        == answer["details"]["input_length"])
        lengths = [input_length[count] for count in sorted(input_length)]
        assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)  # answers sit on their own lines
    finally:
        server.stop_soon()
