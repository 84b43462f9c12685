"""The SageMaker SDK's own local modes driving the built image: train with v3, serve with v2.

    python local_test/sdk_local_mode.py train  IMAGE WORKDIR   # SDK v3 ModelTrainer, LOCAL_CONTAINER
    python local_test/sdk_local_mode.py deploy IMAGE WORKDIR   # SDK v2 Model.deploy(instance_type="local")
    python local_test/sdk_local_mode.py book   IMAGE WORKDIR   # SDK v2 HuggingFaceModel, as the LLM Twin book

`train` writes /opt/ml the way SageMaker does, starts the image through docker compose with no command
(the entrypoint's default: train) and packs WORKDIR/compressed_artifacts/model.tar.gz. `deploy` serves that
tarball: the SDK extracts it into /opt/ml/model, runs `IMAGE serve`, waits for /ping, and `predict` sends a
TGI request through the SDK's local runtime client. `book` deploys as the LLM Twin book does: the SDK's
`HuggingFaceModel(image_uri=..., env={"HF_MODEL_ID": ..., ...})` with no model data (here HF_MODEL_ID is
the model embedded in the image: no hub from this machine), asked the book's payload. Each SDK version
runs in its own environment (they are one distribution, `sagemaker`, at different major versions);
scripts/sdk_local_test.sh sets both up, and a `docker`/`docker-compose` that reach podman. Neither SDK is
ever installed in the image.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"  # local mode never calls IAM
SAMPLE = Path(__file__).resolve().parent / "test_dir" / "input" / "data" / "train"
HYPERPARAMETERS = {"max_steps": "2", "per_device_train_batch_size": "2", "max_length": "128", "validation_split": "0"}


def train(image: str, workdir: Path) -> Path:
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import Compute, InputData
    from sagemaker.train.model_trainer import Mode

    data = workdir / "data" / "train"
    shutil.copytree(SAMPLE, data, dirs_exist_ok=True)
    trainer = ModelTrainer(
        training_image=image, training_mode=Mode.LOCAL_CONTAINER, role=ROLE,
        compute=Compute(instance_type="local_cpu", instance_count=1), hyperparameters=HYPERPARAMETERS,
        input_data_config=[InputData(channel_name="train", data_source=str(data))],
        local_container_root=str(workdir / "container"), base_job_name="llm-twin-sdk-local")
    trainer.train()
    tarball = workdir / "container" / "compressed_artifacts" / "model.tar.gz"
    if not tarball.is_file():
        sys.exit(f"SDK v3 local training finished without {tarball}")
    print(f"SDK v3 ModelTrainer (LOCAL_CONTAINER) trained the image: {tarball} ({tarball.stat().st_size} bytes)")
    return tarball


def deploy(image: str, workdir: Path) -> str:
    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    tarball = workdir / "container" / "compressed_artifacts" / "model.tar.gz"
    model = Model(image_uri=image, model_data=f"file://{tarball}", role=ROLE, predictor_cls=Predictor,
                  sagemaker_session=_local_session(workdir / "serve"),
                  env={"SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true"})
    predictor = model.deploy(initial_instance_count=1, instance_type="local",
                             serializer=JSONSerializer(), deserializer=JSONDeserializer())
    return _ask(predictor, "SDK v2 Model.deploy(instance_type='local') served it", {
        "inputs": "Write one sentence about measuring before optimising.",
        "parameters": {"max_new_tokens": 16, "do_sample": False}}, then=_converse)


def _converse() -> None:
    """The endpoint's WebSocket (what InvokeEndpointWithBidirectionalStream reaches; the SDK's local mode has
    no such call): a session opened on the connection, two turns, the second continuing the first."""
    from websockets.sync.client import connect

    with connect("ws://localhost:8080/invocations-bidirectional-stream", open_timeout=60) as websocket:
        websocket.send(json.dumps({"requestType": "NEW_SESSION"}))
        session = json.loads(websocket.recv(timeout=60))
        answers = []
        for turn in ("My name is Ada.", "What is my name?"):
            websocket.send(json.dumps({"inputs": turn, "stream": False, "parameters": {"max_new_tokens": 12}}))
            answers.append(json.loads(websocket.recv(timeout=120))[0]["generated_text"])
        websocket.send(json.dumps({"requestType": "CLOSE"}))
        closed = json.loads(websocket.recv(timeout=60))
    if not closed.get("closed") or not all(answers):
        sys.exit(f"the bidirectional stream's session did not work: {session}, {answers}, {closed}")
    print(f"bidirectional stream (WebSocket) on the SDK's local endpoint: session {session['session_id']}, "
          f"two turns answered {json.dumps(answers)}, closed")


def book(image: str, workdir: Path) -> str:
    from sagemaker.huggingface import HuggingFaceModel

    session = _local_session(workdir / "book")
    env = {"HF_MODEL_ID": "/opt/models/SmolLM2-135M-Instruct", "SM_NUM_GPUS": "1", "MAX_INPUT_LENGTH": "1024",
           "MAX_TOTAL_TOKENS": "2048", "MAX_BATCH_TOTAL_TOKENS": "8192",
           "HUGGING_FACE_HUB_TOKEN": "hf_not_a_real_token"}
    # SDK v2 local mode cannot start an endpoint without ModelDataUrl (sagemaker/local/entities.py reads it
    # unconditionally), where SageMaker itself can: an empty model.tar.gz stands in, leaving /opt/ml/model
    # empty as SageMaker does. code_location: HuggingFaceModel looks for a bucket for code even when there is
    # none to upload; naming one spares it the account lookup (STS), which cannot answer offline.
    empty = workdir / "book" / "empty-model.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    model = HuggingFaceModel(image_uri=image, env=env, role=ROLE, sagemaker_session=session,
                             model_data=f"file://{empty}", code_location="s3://llm-twin-local/code")
    predictor = model.deploy(initial_instance_count=1, instance_type="local")
    return _ask(predictor, "SDK v2 HuggingFaceModel (the LLM Twin book's deployment, HF_MODEL_ID)", {
        "inputs": "Write a short post about evaluating an LLM twin.",
        "parameters": {"max_new_tokens": 16, "top_p": 0.9, "temperature": 0.01, "return_full_text": False}})


def _local_session(container_root: Path):
    """SDK v2's LocalSession with its containers under container_root. container_config goes into the SDK's
    compose service as is: vLLM needs about 400 MiB of /dev/shm, more than docker's 64 MiB default
    (SageMaker's own hosts give far more)."""
    from sagemaker.local import LocalSession

    container_root.mkdir(parents=True, exist_ok=True)
    session = LocalSession()
    session.config = {"local": {"local_code": True, "container_root": str(container_root),
                                "container_config": {"shm_size": "1g"}}}
    return session


def _ask(predictor, what: str, body: dict, then=None) -> str:
    """One TGI request through the SDK's predictor (and `then`), then the local endpoint deleted; TGI's answer
    or exit."""
    try:
        answer = predictor.predict(body)
        if then is not None:
            then()
    finally:
        print("deleting the local endpoint: the SDK then logs the compose process it stops (exit -15) as an error")
        predictor.delete_endpoint()
    print(f"{what}; predict answered: {json.dumps(answer)}")
    if not (isinstance(answer, list) and answer and answer[0].get("generated_text")):
        sys.exit(f"expected TGI's [{{'generated_text': ...}}], got {answer!r}")
    return answer[0]["generated_text"]


if __name__ == "__main__":
    commands = {"train": train, "deploy": deploy, "book": book}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} train|deploy|book IMAGE WORKDIR")
    commands[sys.argv[1]](sys.argv[2], Path(sys.argv[3]))
