"""Training throughput: our SFT path against a plain TRL SFTTrainer, in one run.

    .venv/bin/python bench/train_throughput.py [--steps 6] [--batch-size 8] [--model-dir DIR] [--adapter lora|full]

Three sides train LoRA (same rank, all linear layers), or every weight with --adapter full, on the embedded
SmolLM2-135M-Instruct (or --model-dir): TRL's defaults (gradient checkpointing on), TRL's defaults with
gradient checkpointing off (what ours does where memory allows), and ours. Each trains one epoch over the
same steps x batch-size rows of local_test/test_dir's sample data (variable-length posts and conversations),
in its own order: fp32 on the CPU, each side's own precision on a GPU. Only the trainer's train() call is
timed (not tokenizing, building the trainer or saving). A forward pre-hook on the model counts, for every
micro-batch, the positions it computes and the real ones among them (attention mask set: not padding).
Printed for each: real tokens per second, padding fraction; then ours over each TRL side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from container.model_dir import embedded_model_dir  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import load_sft_rows  # noqa: E402
from train.model import load_for_training, load_tokenizer  # noqa: E402
from train.plan import detect_device, weights_dtype  # noqa: E402
from train.recipes import RunContext, StageRows, train_stage  # noqa: E402
from train.stop import Stop  # noqa: E402


class TokenCounter:
    """Counts computed and real (non-padding) token positions of every forward pass."""

    def __init__(self, model):
        self.total = self.real = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None or not module.training:
            return
        mask = kwargs.get("attention_mask")
        self.total += ids.numel()
        self.real += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()


class TrainTimer:
    """The seconds spent in transformers' Trainer.train(), whoever calls it (TRL directly, or our train_stage)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        self.original = transformers.Trainer.train

        def timed(trainer, *args, **kwargs):
            started = time.perf_counter()
            try:
                return self.original(trainer, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        transformers.Trainer.train = timed
        return self

    def __exit__(self, *exc):
        transformers.Trainer.train = self.original


def plain_trl(model, tokenizer, rows, steps, batch_size, out, adapter: str = "lora", checkpointing: bool = True):
    """TRL's defaults (gradient checkpointing on unless turned off, random order, no packing); on the CPU only
    what it needs."""
    cpu = {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, report_to="none",
                     save_strategy="no", disable_tqdm=True, logging_steps=steps,
                     **({} if checkpointing else {"gradient_checkpointing": False}), **cpu)
    lora = (LoraConfig(r=32, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            if adapter == "lora" else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    trainer.train()


def plain_trl_without_checkpointing(*args, **kwargs):
    plain_trl(*args, **kwargs, checkpointing=False)


def ours(model, tokenizer, rows, steps, batch_size, out, adapter: str = "lora"):
    config = TrainConfig(max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                         max_length=1024, save_steps=10_000, validation_split=0.0, logging_steps=steps, adapter=adapter)
    train_stage("sft", config, model, tokenizer, StageRows(rows, []), Path(out),
                RunContext(detect_device(config), Stop()))


SIDES = (("plain TRL defaults", plain_trl), ("plain TRL, gradient checkpointing off", plain_trl_without_checkpointing),
         ("ours", ours))


def compare(source: str, rows: list[dict], steps: int, batch_size: int, adapter: str = "lora") -> dict:
    """Both sides on the same model, rows, steps and batch size: real tokens/s and padding of each."""
    config = TrainConfig(adapter=adapter)
    dtype = weights_dtype(config, detect_device(config), "single")  # fp32 for full fine-tuning, as TRL loads it
    results = {}
    rows = rows[:steps * batch_size]  # one epoch of the same rows for every side
    for name, run in SIDES:
        torch.manual_seed(0)
        tokenizer = load_tokenizer(source, config)
        model = load_for_training(source, config, dtype, None)
        counter = TokenCounter(model)
        with tempfile.TemporaryDirectory() as out, TrainTimer() as timer:
            run(model, tokenizer, rows, steps, batch_size, out, adapter)
        seconds = timer.seconds
        results[name] = {"seconds": round(seconds, 1), "real_tokens": counter.real, "positions": counter.total,
                         "real_tokens_per_second": round(counter.real / seconds, 1),
                         "padding_fraction": round(1 - counter.real / counter.total, 3)}
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model-dir", default=str(embedded_model_dir()))
    parser.add_argument("--adapter", choices=("lora", "full"), default="lora")
    options = parser.parse_args()
    rows = load_sft_rows(REPO / "local_test" / "test_dir" / "input" / "data" / "train")
    if len(rows) < options.steps * options.batch_size:
        parser.error(f"--steps x --batch-size must be at most the {len(rows)} sample rows")
    results = compare(options.model_dir, rows, options.steps, options.batch_size, options.adapter)
    print(json.dumps(results, indent=2))
    print(f"steps={options.steps} batch_size={options.batch_size} rows={options.steps * options.batch_size} "
          f"threads={torch.get_num_threads()}")
    ours_rate = results["ours"]["real_tokens_per_second"]
    for name, _ in SIDES[:-1]:
        ratio = ours_rate / results[name]["real_tokens_per_second"]
        print(f"ratio ours / {name} (real tokens per second): {ratio:.2f}")


if __name__ == "__main__":
    main()
