"""Voice from GRPO: do a job's last optimizer steps bring the twin closer to the person's writing when they are
GRPO steps (answers sampled and rewarded for reading as the person's, train/rewards.py) than when they are more
SFT? Two real `train` jobs in one run, on the demo data with the embedded SmolLM2-135M-Instruct:

    .venv/bin/python bench/voice_grpo.py [--steps 32] [--grpo-steps 8] [--eval-prompts 16] [--model-dir DIR]

    sft         method=sft: --steps SFT steps
    sft+grpo    method=sft+grpo: --steps minus --grpo-steps SFT steps, then --grpo-steps GRPO steps

Both train on the same rows and hold out the same --eval-prompts rows (written here as a `validation` channel),
with the same batch size, SFT learning rate, schedule and seed; each stage ends by answering the held-out prompts
as the endpoint would and scoring the answers against the person's (train/voice.py). Printed: a table of the
held-out voice measures of the base, of each job's end, and of sft+grpo's SFT stage (where its GRPO began); the
GRPO stage's rewards at its first and last step; then the ratio sft+grpo / sft of each measure (for the style
distance, below 1: the GRPO steps bought more of the person's style than the same number of SFT steps).

The defaults should take about 15 minutes on 2 idle CPU cores (an SFT step of 4 sample rows about 8 s; a GRPO
step, which samples --num-generations answers of up to --max-completion-length tokens to one prompt, about as
long; each voice measurement about 25 s); a GPU runs GRPO's sampling in vLLM. GRPO's learning rate is the
product's default (auto: 1e-5 with LoRA), so a few GRPO steps move the voice little: --grpo-learning-rate and
--grpo-steps explore more.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local_test.tiny_model import SAMPLE_DATA  # noqa: E402
from train.data import load_sft_rows, split_rows  # noqa: E402

TRAIN = Path(sys.executable).parent / "train"
MEASURES = ("voice_style_distance", "voice_overlap", "voice_length_ratio", "voice_distinct2", "perplexity")


def write_tree(root: Path, hyperparameters: dict, train_rows: list[dict], held_out: list[dict]) -> Path:
    """An /opt/ml tree: the hyperparameters (as strings, as SageMaker sends them), `train` and `validation`."""
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({key: str(value) for key, value in hyperparameters.items()}))
    for channel, rows in (("train", train_rows), ("validation", held_out)):
        (root / "input" / "data" / channel).mkdir(parents=True)
        (root / "input" / "data" / channel / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_job(root: Path) -> tuple[dict, float]:
    """The real `train` on the tree: its training report and minutes. Its output goes to root/train.log."""
    started = time.monotonic()
    with (root / "train.log").open("w") as log:
        code = subprocess.run([str(TRAIN)], env={**os.environ, "SAGEMAKER_BASE_DIR": str(root)}, stdout=log,
                              stderr=subprocess.STDOUT).returncode
    minutes = (time.monotonic() - started) / 60
    if code != 0:
        tail = (root / "train.log").read_text().splitlines()[-30:]
        sys.exit(f"{root.name}: train exited with {code}:\n" + "\n".join(tail))
    return json.loads((root / "model" / "training_report.json").read_text()), minutes


def row(name: str, voice: dict, minutes: float | None = None) -> str:
    cells = [f"{voice.get(m, float('nan')):>{len(m)}.4f}" for m in MEASURES]
    return f"{name:<22} " + " ".join(cells) + (f" {minutes:>7.1f}" if minutes is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps of each job")
    parser.add_argument("--grpo-steps", type=int, default=8, help="of those, GRPO steps in the sft+grpo job")
    parser.add_argument("--eval-prompts", type=int, default=16, help="held-out rows answered for the voice measures")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size (answers, in GRPO)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="SFT's (the demo's)")
    parser.add_argument("--grpo-learning-rate", type=float, default=0.0, help="GRPO's; 0 = auto (1e-5, LoRA)")
    parser.add_argument("--model-dir", default="", help="base model folder; empty: the embedded SmolLM2-135M")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keep", default="", help="keep the two jobs' /opt/ml trees (and train.log) in this folder")
    options = parser.parse_args()
    if not 0 < options.grpo_steps < options.steps:
        parser.error("--grpo-steps must be between 0 and --steps (both jobs start with SFT)")
    if options.eval_prompts < 1:
        parser.error("--eval-prompts must be at least 1: the held-out answers are what this measures")

    rows = load_sft_rows(SAMPLE_DATA)
    train_rows, held_out = split_rows(rows, options.eval_prompts / len(rows), options.seed)
    common = {"model_id": options.model_dir, "per_device_train_batch_size": options.batch_size,
              "gradient_accumulation_steps": 1, "max_length": options.max_length,
              "learning_rate": options.learning_rate, "warmup_steps": 2, "seed": options.seed,
              "voice_eval_prompts": options.eval_prompts, "voice_max_new_tokens": options.max_completion_length,
              "save_steps": 10_000, "logging_steps": 1, "num_generations": options.num_generations,
              "max_completion_length": options.max_completion_length,
              "dpo_learning_rate": options.grpo_learning_rate}
    jobs = {"sft": {**common, "method": "sft", "max_steps": options.steps},
            "sft+grpo": {**common, "method": "sft+grpo", "max_steps": options.steps - options.grpo_steps,
                         "dpo_max_steps": options.grpo_steps}}

    reports, minutes = {}, {}
    with tempfile.TemporaryDirectory(prefix="voice-grpo-") as scratch:
        work = Path(options.keep or scratch)
        for name, hyperparameters in jobs.items():
            print(f"{name}: training ({hyperparameters['max_steps']} SFT steps"
                  + (f", then {options.grpo_steps} GRPO steps" if name != "sft" else "") + ") ...", flush=True)
            reports[name], minutes[name] = run_job(write_tree(work / name.replace("+", "-"), hyperparameters,
                                                              train_rows, held_out))

    sft, grpo = reports["sft"]["stages"]["sft"], reports["sft+grpo"]["stages"]
    print(f"\nheld-out voice ({len(held_out)} rows held out, {options.eval_prompts} answered; {len(train_rows)} "
          f"to train on; batch {options.batch_size})")
    print(f"{'':<22} " + " ".join(MEASURES) + " minutes")
    print(row("base model", sft["voice"]["before"]))
    print(row(f"sft ({options.steps} steps)", sft["voice"]["after"], minutes["sft"]))
    print(row(f"  its SFT ({options.steps - options.grpo_steps} steps)", grpo["sft"]["voice"]["after"]))
    print(row(f"sft+grpo (+{options.grpo_steps} GRPO)", grpo["grpo"]["voice"]["after"], minutes["sft+grpo"]))
    rewards = grpo["grpo"]["grpo"]
    print(f"\nGRPO rewards (weights {rewards['reward_weights']}, sampled with {rewards['generation']}):")
    for when in ("first", "last"):
        print(f"  {when:<5} " + " ".join(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                                          for key, value in (rewards[when] or {}).items()))
    ours, theirs = grpo["grpo"]["voice"]["after"], sft["voice"]["after"]
    print("\nratio (sft+grpo / sft): " + " ".join(f"{m}={ours[m] / theirs[m]:.3f}" if theirs.get(m) else f"{m}=n/a"
                                                  for m in MEASURES))
    if theirs["voice_style_distance"]:
        print(f"style distance ratio (below 1: the GRPO steps moved the answers' style closer to the person's "
              f"than the same SFT steps): {ours['voice_style_distance'] / theirs['voice_style_distance']:.3f}")
    if options.keep:
        print(f"the jobs' trees and logs: {options.keep}")


if __name__ == "__main__":
    main()
