"""train/model_card.py: the header names a base and a license only when they are known."""

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
