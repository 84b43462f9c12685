"""preference=auto: preference pairs from the person's own writing, built in the job.

For each SFT row the person's real answer is "chosen" and the model's own greedy answer to the same prompt
(the model the preference stage starts from: the base, or the SFT model in sft+dpo) is "rejected": what
the model says by itself is what it should move away from, towards how the person says it (the idea of
SPIN's self-play, without a hub or another LLM to write the rejected answers). Rows whose generated answer
equals the real one are dropped. The pairs are written once to the stage's checkpoint folder, named after
the rows they come from (a restart on the same data reuses them), and shipped with the model as
preference_pairs.jsonl for inspection: like the model card's samples, they hold the person's writing
(keep_writing_private ships neither: the pairs stay in the checkpoints).
"""

from __future__ import annotations

import hashlib
import json

from train.data import DataError
from train.voice import generate

PAIRS_FILE = "preference_pairs.jsonl"


def build_pairs(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[dict | None]:
    """One pair per row, in order; None for a row whose generated answer is the person's own."""
    if any("completion" not in row for row in rows):
        raise DataError("preference=auto needs conversation rows in the 'train' channel "
                        "({\"instruction\", \"output\"}, {\"prompt\", \"completion\"} or {\"messages\"}): "
                        "plain {\"text\"} rows have no answer to prefer")
    answers = generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens)
    return [{"prompt": row["prompt"], "chosen": row["completion"],
             "rejected": [{"role": "assistant", "content": answer}]}
            if answer.strip() != row["completion"][-1]["content"].strip() else None
            for row, answer in zip(rows, answers)]


def rows_digest(rows: list[dict]) -> str:
    """A short digest of the rows pairs are built from: pairs built from other rows are not reused."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]


def kto_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as KTO's unpaired rows: the chosen answer good, the rejected one bad."""
    return [row for pair in pairs for row in (
        {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
        {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})]
