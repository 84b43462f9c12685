"""The tracking policy: a tracker failing mid-job is dropped, the others go on; passwords are masked."""

import logging

from train.tracking import Tracking, shown_uri


class Recorder:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.calls = name, fail, []

    def log(self, stage, step, metrics):
        if self.fail:
            raise ConnectionError("tracking server went away")
        self.calls.append((stage, step, metrics))

    def close(self, outcome):
        self.calls.append(outcome)


def test_a_tracker_that_fails_is_dropped_with_a_warning_and_the_others_keep_their_metrics(caplog):
    broken, working = Recorder("mlflow", fail=True), Recorder("tensorboard")
    tracking = Tracking([broken, working])
    with caplog.at_level(logging.WARNING):
        tracking.log("sft", 3, {"loss": 1.5, "eval_loss": 1.25, "voice_overlap": 0.5, "perplexity": None, "note": "x"})
        tracking.log("sft", 4, {"loss": 1.25})
        tracking.close("finished")
    assert "report_to=mlflow failed (ConnectionError: tracking server went away)" in caplog.text
    assert tracking.trackers == [working] and broken.calls == []
    assert working.calls == [("sft", 3, {"train/loss": 1.5, "eval/loss": 1.25, "voice/overlap": 0.5}),
                             ("sft", 4, {"train/loss": 1.25}), "finished"]


def test_a_uri_is_shown_without_its_password():
    assert shown_uri("https://me:s3cret@mlflow.example.com/x") == "https://****@mlflow.example.com/x"
    assert shown_uri("arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/t") == \
        "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/t"
    assert "s3cret" not in shown_uri("failed to reach http://u:s3cret@h:9/api and https://v:s3cret@h2/")
