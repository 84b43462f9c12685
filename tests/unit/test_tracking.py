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
    check_environment(("mlflow",), {"MLFLOW_TRACKING_URI": "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/t"})
    with pytest.raises(ConfigError, match="put them in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        check_environment(("mlflow",), {"MLFLOW_TRACKING_URI": "https://me:s3cret@mlflow.example.com/x"})
