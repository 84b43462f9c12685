"""train/model_card.py: the header names a base and a license only when they are known; the voice table and the
sample answers put the base and every stage side by side."""

from train.config import TrainConfig
from train.model_card import model_card

REPORT = {"config": {}, "device": "cpu", "precision": "fp32",
          "stages": {"sft": {"examples": 10, "eval_examples": 2, "steps": 5, "metrics": {"train_loss": 1.0},
                             "voice": {"before": {"voice_overlap": 0.1}, "after": {"voice_overlap": 0.3},
                                       "samples": [{"prompt": "Hi\nthere", "reference": "Hey!", "before": "Hello.",
                                                    "after": "Hey there!"}]}}}}


def header(card: str) -> str:
    return card.split("---")[1]


def test_the_embedded_base_is_named_by_its_hub_id_with_the_license_its_own_card_states(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# SmolLM2\n")
    card = model_card(TrainConfig(), REPORT, "embedded", str(tmp_path), "merged")
    assert ('base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in header(card)
            and 'license: "apache-2.0"' in header(card))
    assert "| word overlap with the real answers (unigram F1) | 0.1 | 0.3 | higher |" in card
    assert "- **Prompt:** Hi there" in card  # one line: no newline breaks the Markdown list


def test_a_hub_base_without_a_local_card_gets_no_license_and_an_adapter_export_says_peft(tmp_path):
    card = model_card(TrainConfig(adapter="lora", export="adapter"), REPORT, "meta-llama/Llama-3.1-8B",
                      "meta-llama/Llama-3.1-8B", "adapter")
    assert 'base_model: "meta-llama/Llama-3.1-8B"' in header(card) and "license" not in header(card)
    assert 'library_name: "peft"' in header(card)


SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1, "seed": 42,
            "from_generation_config": [], "max_new_tokens": 128}


def voiced_stage(before: dict, after: dict, samples: list[dict], digest: str = "d1", sampling: dict = SAMPLING):
    return {"examples": 8, "eval_examples": 2, "steps": 3, "metrics": {},
            "voice": {"before": before, "after": after, "samples": samples, "sampling": sampling,
                      "prompts_digest": digest}}


def sft_dpo_report(dpo_digest: str = "d1", dpo_sampling: dict = SAMPLING) -> dict:
    """sft+dpo: DPO starts from the SFT model, so its "before" answers are the SFT model's. DPO's second prompt
    is one SFT did not sample (a preference channel's own held-out rows)."""
    sft = voiced_stage({"voice_overlap": 0.1}, {"voice_overlap": 0.3},
                       [{"prompt": "Why\nevaluate?", "reference": "Because tone drifts!", "before": "Evaluation is.",
                         "after": "Tone drifts, so."},
                        {"prompt": "Ship it?", "reference": "Not yet.", "before": "Yes yes yes.",
                         "after": "Not today."}])
    dpo = voiced_stage({"voice_overlap": 0.29}, {"voice_overlap": 0.4},
                       [{"prompt": "Why\nevaluate?", "reference": "Because tone drifts!", "before": "Tone drifts.",
                         "after": "Because tone drifts."},
                        {"prompt": "Which rank?", "reference": "Sixteen, always.", "before": "Rank 8.",
                         "after": "Sixteen."}], dpo_digest, dpo_sampling)
    return {"config": {}, "device": "cpu", "precision": "fp32", "stages": {"sft": sft, "dpo": dpo}}


def section(card: str, title: str) -> str:
    return card.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_sample_answers_show_the_person_the_base_and_each_stage_side_by_side_per_prompt(tmp_path):
    config = TrainConfig.from_hyperparameters({"method": "sft+dpo"})
    card = model_card(config, sft_dpo_report(), "embedded", str(tmp_path), "merged")
    assert card.count("\n## Sample answers\n") == 1
    assert [line for line in section(card, "Sample answers").splitlines() if line.lstrip().startswith("- ")] == [
        "- **Prompt:** Why evaluate?",  # joined by prompt text across the stages, in stage order
        "  - the person: Because tone drifts!", "  - base: Evaluation is.", "  - sft: Tone drifts, so.",
        "  - dpo: Because tone drifts.",
        "- **Prompt:** Ship it?", "  - the person: Not yet.", "  - base: Yes yes yes.", "  - sft: Not today.",
        "- **Prompt:** Which rank?",  # only DPO's: its starting model is the SFT model
        "  - the person: Sixteen, always.", "  - sft: Rank 8.", "  - dpo: Sixteen."]
    # the same held-out rows in both stages: one voice table, a column per model
    assert card.count("\n## Voice") == 1
    assert "| measure | base | sft | dpo | better |" in card
    assert "| word overlap with the real answers (unigram F1) | 0.1 | 0.3 | 0.4 | higher |" in card
    assert ("Answers are generated as the endpoint samples: temperature 0.7, top_p 0.9, repetition_penalty 1.1; "
            "seed 42 before each model's answers, at most 128 new tokens (the image's defaults: the model's "
            "generation_config.json sets none).") in card


def test_stages_on_different_held_out_rows_get_a_voice_table_each_with_their_own_sampling(tmp_path):
    own = {**SAMPLING, "temperature": 0.6, "from_generation_config": ["temperature"]}
    config = TrainConfig.from_hyperparameters({"method": "sft+dpo"})
    card = model_card(config, sft_dpo_report("d2", own), "embedded", str(tmp_path), "merged")
    sft = section(card, "Voice (sft): base, sft, on the person's held-out writing")
    assert "| measure | base | sft | better |" in sft and "temperature 0.7, top_p 0.9" in sft
    dpo = section(card, "Voice (dpo): sft, dpo, on the person's held-out writing")
    assert "| word overlap with the real answers (unigram F1) | 0.29 | 0.4 | higher |" in dpo
    assert "temperature 0.6, top_p 0.9" in dpo and "(temperature from the model's generation_config.json" in dpo
    assert card.count("\n## Sample answers\n") == 1


def test_keep_writing_private_leaves_every_stage_s_samples_out_and_keeps_the_sampling_line(tmp_path):
    config = TrainConfig.from_hyperparameters({"method": "sft+dpo", "keep_writing_private": "true"})
    card = model_card(config, sft_dpo_report(), "embedded", str(tmp_path), "merged")
    assert "Sample answers are left out (keep_writing_private=true)" in card
    assert "Answers are generated as the endpoint samples: temperature 0.7" in card
    writing = [text for stage in sft_dpo_report()["stages"].values() for sample in stage["voice"]["samples"]
               for text in sample.values()]
    assert [text for text in writing if text.replace("\n", " ") in card] == []


def test_rows_made_from_documents_say_where_they_came_from_in_counts_only(tmp_path):
    made = {"teacher": "/opt/ml/input/data/model", "teacher_name": "the base model", "teacher_revision": None,
            "engine": "vLLM", "documents": 16, "held_out_documents": 2, "instructions_keep": 0.8, "seconds": 60.0,
            "train": {"passages": 35, "failed_checks": {}, "passed": 34, "kept": 28},
            "held_out": {"passages": 6, "failed_checks": {}, "passed": 6, "kept": 6}}
    card = model_card(TrainConfig(instructions="auto"), {**REPORT, "instructions": made}, "embedded", str(tmp_path),
                      "merged")
    assert ("from 16 documents of the person's writing (instructions=auto): the base model wrote the instruction "
            "each passage answers (vLLM); 28 of 35 passages kept (34 passed the checks, instructions_keep=0.8); 2 "
            "whole documents (6 passages) held out for the voice.") in card
    assert "instructions=auto" not in model_card(TrainConfig(), REPORT, "embedded", str(tmp_path), "merged")
