"""Voice metrics, early stopping, the best checkpoint and the model card, through the real `train`."""

import json

import pytest

from tests.helpers import TINY_ROWS, jsonl, link_model_channel, make_tree, run_train

FAST = {"per_device_train_batch_size": "2", "gradient_accumulation_steps": "1", "max_length": "64",
        "warmup_steps": "0", "voice_max_new_tokens": "6"}
HELD_OUT = [{"instruction": f"Write about lesson {i}.", "output": f"Lesson {i}: measure first, then tune!"}
            for i in range(3)]


def read_records(path):
    """TFRecord framing: length (8 bytes), its CRC (4), the data, its CRC (4)."""
    import struct

    blob = path.read_bytes()
    offset = 0
    while offset < len(blob):
        (length,) = struct.unpack("<Q", blob[offset:offset + 8])
        yield blob[offset + 12:offset + 12 + length]
        offset += 12 + length + 4


def train(root):
    result = run_train(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((root / "model" / "training_report.json").read_text())


def test_voice_metrics_are_logged_at_every_evaluation_and_reported_before_and_after_in_the_model_card(
        tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "max_steps": "4", "eval_steps": "2", "voice_eval_prompts": "2",
                                "report_to": "tensorboard"},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "validation/v.jsonl": jsonl(HELD_OUT)})
    link_model_channel(root, tiny_model)
    stdout, report = train(root)
    lines = [line for line in stdout.splitlines() if line.startswith("stage=sft") and "voice_style_distance=" in line]
    assert [line.split()[1] for line in lines] == ["step=2", "step=4", "step=4"]  # at steps 2 and 4, and the final one
    assert lines[1] == lines[2]  # the same weights, sampled from the same seed: the same numbers
    assert all("perplexity=" in line and "voice_overlap=" in line for line in lines)
    voice = report["stages"]["sft"]["voice"]
    keys = {"voice_length_ratio", "voice_distinct2", "voice_style_distance", "voice_overlap"}
    assert keys | {"perplexity"} <= set(voice["before"]) and keys | {"perplexity"} <= set(voice["after"])
    assert voice["before"]["perplexity"] > voice["after"]["perplexity"] > 1.0  # the person's text: less surprising
    assert all(0.0 <= voice["after"][k] <= 1.0 for k in ("voice_style_distance", "voice_overlap", "voice_distinct2"))
    assert [s["reference"] for s in voice["samples"]] == [r["output"] for r in HELD_OUT[:2]]
    assert all("before" in s and "after" in s for s in voice["samples"])
    # sampled as the endpoint samples: the tiny model's generation_config.json sets no sampling field
    assert voice["sampling"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0,
                                 "repetition_penalty": 1.1, "seed": 42, "from_generation_config": [],
                                 "max_new_tokens": 6}
    assert len(voice["prompts_digest"]) == 12

    # report_to=tensorboard: event files where SageMaker's TensorBoardOutputConfig uploads them from
    from tensorboardX.proto import event_pb2

    events = list((root / "output" / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files"
    tags = set()
    for data in read_records(events[0]):
        event = event_pb2.Event.FromString(data)
        tags |= {value.tag for value in event.summary.value}
    assert {"train/loss", "eval/loss", "voice/style_distance", "eval/perplexity"} <= tags, tags

    card = (root / "model" / "README.md").read_text()
    header = card.split("---")[1]
    assert 'library_name: "transformers"' in header
    assert "base_model:" not in header and "license:" not in header  # a local folder: no hub id, no license known
    assert '- "llm-twin"' in header and '- "sft"' in header
    assert "| style distance (function words, punctuation) |" in card and "| measure | base | sft | better |" in card
    assert "Answers are generated as the endpoint samples: temperature 0.7, top_p 0.9, repetition_penalty 1.1" in card
    samples = card.split("\n## Sample answers\n")[1].split("\n## ")[0]
    assert "- **Prompt:** Write about lesson 0." in samples
    assert "  - the person: Lesson 0: measure first, then tune!" in samples
    assert samples.count("  - base: ") == samples.count("  - sft: ") == 2


def test_early_stopping_ends_a_stage_whose_eval_loss_stops_improving_and_exports_the_best_checkpoint(
        tmp_path, tiny_model):
    """A learning rate far too high: the held-out loss gets worse after the first evaluations, so with
    patience 2 the stage ends long before its 40 steps, and the best checkpoint's weights are exported."""
    root = make_tree(tmp_path, {**FAST, "max_steps": "40", "eval_steps": "1", "save_steps": "1",
                                "save_total_limit": "2", "learning_rate": "0.5", "early_stopping_patience": "2",
                                "load_best_model_at_end": "true", "voice_eval_prompts": "0"},
                     {"train/d.jsonl": jsonl(TINY_ROWS), "validation/v.jsonl": jsonl(HELD_OUT)})
    link_model_channel(root, tiny_model)
    stdout, report = train(root)
    sft = report["stages"]["sft"]
    assert sft["steps"] < 40, sft
    best = sft["best"]
    assert best["metric"] == "eval_loss" and best["loaded"] and best["checkpoint"].startswith("checkpoint-")
    assert int(best["checkpoint"].split("-")[1]) <= sft["steps"] - 2  # patience: two evaluations after the best
    losses = [float(line.split("eval_loss=")[1].split()[0]) for line in stdout.splitlines()
              if line.startswith("stage=sft") and "eval_loss=" in line]
    # the log prints 6 significant digits; the final evaluation runs on the best weights
    assert min(losses[:-1]) == pytest.approx(best["value"], rel=1e-5) == losses[-1]


def test_early_stopping_without_evaluations_is_refused_naming_the_fix(tmp_path, tiny_model):
    root = make_tree(tmp_path, {**FAST, "max_steps": "4", "early_stopping_patience": "2"},
                     {"train/d.jsonl": jsonl(TINY_ROWS)})
    result = run_train(root)
    assert result.returncode == 2
    assert "set eval_steps" in (root / "output" / "failure").read_text()
