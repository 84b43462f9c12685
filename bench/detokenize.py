"""Streaming detokenization cost: the serving batcher's windowed decode against decoding the whole
output at every step (what it did before), in one run.

    .venv/bin/python bench/detokenize.py [--tokens 1024] [--sequences 32]

Both produce the same text. For `--sequences` outputs of `--tokens` tokens each (the sample posts,
tokenized with the embedded SmolLM2 tokenizer), it times the CPU work the engine thread does per decode
step to turn tokens into streamed text, and prints milliseconds per step for each and their ratio. The
per-step figure is what a GPU step (tens of milliseconds for a batch) would wait on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers import AutoTokenizer  # noqa: E402

from container.model_dir import embedded_model_dir  # noqa: E402
from serve.batcher import Sequence, _new_text  # noqa: E402


def sample_ids(tokenizer, tokens: int) -> list[int]:
    rows = (REPO / "local_test" / "test_dir" / "input" / "data" / "train").glob("*.jsonl")
    text = "\n\n".join(line for path in sorted(rows) for line in path.read_text().splitlines())
    ids = tokenizer.encode(json.dumps(text, ensure_ascii=False), add_special_tokens=False)
    return (ids * (tokens // len(ids) + 1))[:tokens]


def whole_decode(tokenizer, ids: list[int]) -> str:
    text = ""
    for n in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):
            text = decoded
    return text


def windowed_decode(tokenizer, ids: list[int]) -> str:
    s = Sequence(request=None, prompt_ids=[], max_new_tokens=len(ids), emit=None)
    for token in ids:
        s.generated.append(token)
        s.text += _new_text(tokenizer, s)
    return s.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--sequences", type=int, default=32)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    ids = sample_ids(tokenizer, args.tokens)
    results = {}
    for name, decode in (("whole output every step", whole_decode), ("windowed (ours)", windowed_decode)):
        started = time.perf_counter()
        texts = [decode(tokenizer, ids) for _ in range(args.sequences)]
        per_step_ms = (time.perf_counter() - started) / args.tokens * 1000
        results[name] = (per_step_ms, texts[0])
        print(f"{name:>24}: {per_step_ms:8.2f} ms of CPU per decode step ({args.sequences} sequences, {args.tokens} tokens)")
    (baseline, baseline_text), (ours, our_text) = results.values()
    assert our_text == baseline_text, "the two decodes disagree"
    print(f"ratio (whole / windowed): {baseline / ours:.1f}x less detokenization time per step")


if __name__ == "__main__":
    main()
