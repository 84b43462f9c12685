"""keep_writing_private: the model card, training_report.json and the files shipped with the model hold none
of the person's writing (held-out prompts and answers, the models' sample answers, preference=auto's pairs),
only counts and aggregate metrics. Through a real job with all three trackers: tests/contract/test_tracking.py."""

import json

from tests.unit.test_model_card import REPORT
from train.config import TrainConfig
from train.model_card import model_card

PRIVATE = TrainConfig.from_hyperparameters({"keep_writing_private": "true"})
# REPORT's sample: its prompt (as the card and as JSON write it), the person's answer, the base's, the twin's
WRITING = ("Hi there", "Hi\\nthere", "Hey!", "Hello.", "Hey there!")


def test_it_is_off_unless_asked_for():
    assert not TrainConfig().keep_writing_private and PRIVATE.keep_writing_private


def test_the_model_card_keeps_the_voice_measures_and_leaves_the_samples_out(tmp_path):
    card = model_card(PRIVATE, REPORT, "embedded", str(tmp_path), "merged")
    assert "| word overlap with the real answers (unigram F1) | 0.1 | 0.3 | higher |" in card
    assert "Sample answers are left out (keep_writing_private=true)" in card
    assert [text for text in WRITING if text in card] == []


def test_the_published_report_and_files_hold_no_writing(tmp_path):
    from train.pipeline import published
    from train.preferences import PAIRS_FILE

    extras = {PAIRS_FILE: tmp_path / PAIRS_FILE}
    report, files = published(PRIVATE, REPORT, extras)
    assert files == {}  # preference=auto's pairs stay in the checkpoints
    voice = report["stages"]["sft"]["voice"]
    assert voice == {"before": {"voice_overlap": 0.1}, "after": {"voice_overlap": 0.3}}
    assert [text for text in WRITING if text in json.dumps(report)] == []
    assert REPORT["stages"]["sft"]["voice"]["samples"]  # the job's own report is left as it is
    assert published(TrainConfig(), REPORT, extras) == (REPORT, extras)  # by default, as before
