"""The SageMaker SDK's own local modes driving the built image: train with v3, serve with v2.

    python local_test/sdk_local_mode.py train  IMAGE WORKDIR   # SDK v3 ModelTrainer, LOCAL_CONTAINER
    python local_test/sdk_local_mode.py deploy IMAGE WORKDIR   # SDK v2 Model.deploy(instance_type="local")

`train` writes /opt/ml the way SageMaker does, starts the image through docker compose with no command
(the entrypoint's default: train) and packs WORKDIR/compressed_artifacts/model.tar.gz. `deploy` serves that
tarball: the SDK extracts it into /opt/ml/model, runs `IMAGE serve`, waits for /ping, and `predict` sends a
TGI request through the SDK's local runtime client. Each SDK version runs in its own environment (they are
one distribution, `sagemaker`, at different major versions); scripts/sdk_local_test.sh sets both up, and a
`docker`/`docker-compose` that reach podman. Neither SDK is ever installed in the image.
"""

from __future__ import annotations

import json
import shutil
import sys
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
    from sagemaker.local import LocalSession
    from sagemaker.model import Model
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import JSONSerializer

    tarball = workdir / "container" / "compressed_artifacts" / "model.tar.gz"
    session = LocalSession()
    # container_config goes into the SDK's compose service as is: vLLM needs about 400 MiB of /dev/shm,
    # more than docker's 64 MiB default (SageMaker's own hosts give far more).
    session.config = {"local": {"local_code": True, "container_root": str(workdir / "serve"),
                                "container_config": {"shm_size": "1g"}}}
    (workdir / "serve").mkdir(parents=True, exist_ok=True)
    model = Model(image_uri=image, model_data=f"file://{tarball}", role=ROLE, sagemaker_session=session,
                  predictor_cls=Predictor)
    predictor = model.deploy(initial_instance_count=1, instance_type="local",
                             serializer=JSONSerializer(), deserializer=JSONDeserializer())
    try:
        answer = predictor.predict({"inputs": "Write one sentence about measuring before optimising.",
                                    "parameters": {"max_new_tokens": 16, "do_sample": False}})
    finally:
        print("deleting the local endpoint: the SDK then logs the compose process it stops (exit -15) as an error")
        predictor.delete_endpoint()
    print(f"SDK v2 Model.deploy(instance_type='local') served it; predict answered: {json.dumps(answer)}")
    if not (isinstance(answer, list) and answer and answer[0].get("generated_text")):
        sys.exit(f"expected TGI's [{{'generated_text': ...}}], got {answer!r}")
    return answer[0]["generated_text"]


if __name__ == "__main__":
    commands = {"train": train, "deploy": deploy}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        sys.exit(f"usage: python {sys.argv[0]} train|deploy IMAGE WORKDIR")
    commands[sys.argv[1]](sys.argv[2], Path(sys.argv[3]))
