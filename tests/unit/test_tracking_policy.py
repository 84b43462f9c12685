"""The tracking policy: a tracker failing mid-job is dropped and closed, the others go on; a password in a
tracking URI is refused."""

import logging

import pytest

from container.config import ConfigError
from train.tracking import Tracking, check_environment


class Recorder:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.calls = name, fail, []

    def log(self, stage, step, metrics):
        if self.fail:
            raise ConnectionError("tracking server went away")
        self.calls.append((stage, step, metrics))

    def close(self, outcome):
        self.calls.append(outcome)  # even a broken one: its run is closed


def test_a_tracker_that_fails_is_dropped_with_a_warning_and_the_others_keep_their_metrics(caplog):
    broken, working = Recorder("mlflow", fail=True), Recorder("tensorboard")
    tracking = Tracking([broken, working])
    with caplog.at_level(logging.WARNING):
        tracking.log("sft", 3, {"loss": 1.5, "eval_loss": 1.25, "voice_overlap": 0.5, "perplexity": None, "note": "x"})
        tracking.log("sft", 4, {"loss": 1.25})
        tracking.close("finished")
    assert "report_to=mlflow failed (ConnectionError: tracking server went away)" in caplog.text
    assert tracking.trackers == [working] and broken.calls == ["failed"]  # dropped, and its run closed as failed
    assert working.calls == [("sft", 3, {"train/loss": 1.5, "eval/loss": 1.25, "voice/overlap": 0.5}),
                             ("sft", 4, {"train/loss": 1.25}), "finished"]


def test_a_tracking_uri_holding_a_password_is_refused_before_it_can_be_logged():
    check_environment(("mlflow",), {"MLFLOW_TRACKING_URI": "https://mlflow.example.com/x"})
    check_environment(("mlflow",),
                      {"MLFLOW_TRACKING_URI": "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/t"})
    with pytest.raises(ConfigError, match="put them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        check_environment(("mlflow",), {"MLFLOW_TRACKING_URI": "https://me:s3cret@mlflow.example.com/x"})


def test_a_sagemaker_mlflow_arn_reaches_sagemakers_tracking_endpoint_signed_with_the_jobs_role(monkeypatch):
    """With the pinned packages, an ARN as MLFLOW_TRACKING_URI is the sagemaker-mlflow plugin's: requests go to
    the region's SageMaker MLflow endpoint, name the server in a header, and are signed by its auth provider
    (the job role's credentials). The request itself needs AWS, which this test does not have."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _get_store
    from mlflow.tracking.request_header.registry import resolve_request_headers

    arn = "arn:aws:sagemaker:eu-west-1:111122223333:mlflow-tracking-server/twins"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", arn)
    credentials = _get_store(arn).get_host_creds()
    assert credentials.host == "https://eu-west-1.experiments.sagemaker.aws" and credentials.auth == "arn"
    mlflow.set_tracking_uri(arn)
    try:
        assert resolve_request_headers()["x-mlflow-sm-tracking-server-arn"] == arn
    finally:
        mlflow.set_tracking_uri(None)
