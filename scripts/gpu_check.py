"""`make gpu-check`: the training paths that only a GPU exercises, in one run that prints one table.

    python scripts/gpu_check.py [--dry-run] [--out DIR]

For a machine with one CUDA GPU and no network (vLLM's CUDA wheel is too large to carry there, so this
covers training and the model the server would load; serving on a GPU is tests/gpu's with vLLM present):

1. the `gpu`-marked tests;
2. bf16 LoRA SFT through the real `train` entrypoint → the merged model → reloaded on the GPU, generating; full
   fine-tuning the same way, its weights in fp32 (the master copy) and computing in bf16;
3. QLoRA (bitsandbytes 4-bit nf4) training and the merge onto the 16-bit base;
4. DeepSpeed ZeRO-3 on one GPU;
5. padding-free packing (flash-attention's path where it is installed, else SDPA's);
6. training tokens/s and MFU of a randomly initialised ~1B Llama, LoRA and full, against plain TRL
   defaults (bench/train_throughput.py's comparison).

The models are built on the spot (a tiny one from local_test/tiny_model.py, and the ~1B one). `--dry-run` runs
every row on the CPU with tiny sizes, so the script is known to work before GPU minutes are spent (a
test does this). Rows that fail are marked FAIL with the first line of the reason; the exit code is the
number of failed rows.
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
BIN = Path(sys.executable).parent
SAMPLE_DATA = REPO / "local_test" / "test_dir" / "input" / "data" / "train"
# Dense bf16 tensor-core peak (no sparsity), for MFU; other cards print no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12}


def train(tmp: Path, name: str, model_dir: Path, hyperparameters: dict) -> Path:
    """Run the real `train` entrypoint on an /opt/ml tree holding the sample data; return the tree."""
    root = tmp / name
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "data").mkdir(parents=True)
    (root / "input" / "data" / "train").symlink_to(SAMPLE_DATA, target_is_directory=True)
    (root / "input" / "data" / "model").symlink_to(model_dir, target_is_directory=True)
    settings = {"max_steps": "3", "per_device_train_batch_size": "4", "gradient_accumulation_steps": "1",
                "max_length": "256", "warmup_steps": "0", "validation_split": "0", **hyperparameters}
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(settings))
    command = [str(BIN / "train")] if (BIN / "train").exists() else [sys.executable, "-m", "train"]
    result = subprocess.run(command, env={**os.environ, "SAGEMAKER_BASE_DIR": str(root), "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        failure = root / "output" / "failure"
        reason = failure.read_text() if failure.is_file() else (result.stderr or result.stdout)[-2000:]
        raise RuntimeError(reason.strip().splitlines()[0] if reason.strip() else f"train exited {result.returncode}")
    return root


def trained_and_served(tmp: Path, name: str, model_dir: Path, hyperparameters: dict, expect: dict) -> str:
    """Train, check what the training report says about the path taken, reload the model and generate."""
    root = train(tmp, name, model_dir, hyperparameters)
    stage = json.loads((root / "model" / "training_report.json").read_text())["stages"]["sft"]
    wrong = {key: stage.get(key) for key, value in expect.items() if stage.get(key) != value}
    if wrong:
        raise RuntimeError(f"the run took another path: {wrong}, expected {expect}")
    return reload_and_generate(root)


def reload_and_generate(root: Path) -> str:
    """The published model as `serve` would load it: safetensors, reloaded onto the device, generating."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = root / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", use_safetensors=True).to(device)
    inputs = tokenizer("Write about lesson 1.", return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    stage = json.loads((model_dir / "training_report.json").read_text())["stages"]["sft"]
    keys = ("distributed", "weights_dtype", "bf16", "packing", "gradient_checkpointing", "tokens_per_second")
    path = {key: stage.get(key) for key in keys}
    return (f"{model.dtype} on {device}, generated {out.shape[1] - inputs['input_ids'].shape[1]} tokens; "
            f"{json.dumps(path)}")


def build_llama(out: Path, tokenizer_dir: Path, dry_run: bool) -> tuple[Path, int]:
    """A randomly initialised Llama: about 1.1B parameters (hidden 2048, 16 layers), or tiny for a dry run."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1) \
        if dry_run else dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def throughput(model_dir: Path, params: int, adapter: str, dry_run: bool) -> str:
    import torch

    from bench.train_throughput import compare
    from train.data import load_sft_rows

    rows = load_sft_rows(SAMPLE_DATA)
    results = compare(str(model_dir), rows, steps=2 if dry_run else 8, batch_size=2 if dry_run else 8, adapter=adapter)
    ours, plain = results["ours"]["real_tokens_per_second"], results["plain TRL defaults"]["real_tokens_per_second"]
    figure = f"ours {ours:.0f} tok/s, plain TRL defaults {plain:.0f} tok/s ({ours / plain:.2f}x)"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)
    if peak:  # full: 6 flops per parameter per token; LoRA: about 4 (no weight gradients for the frozen base)
        per_token = (6 if adapter == "full" else 4) * params
        figure += f"; MFU ours {per_token * ours / peak:.1%}, plain {per_token * plain / peak:.1%}"
    return figure


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: checks the script itself")
    parser.add_argument("--out", help="also write the table here as JSON")
    options = parser.parse_args()
    import torch

    from local_test.tiny_model import build_tiny_model

    if not options.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU (use --dry-run to check the script on the CPU)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    rows: list[dict] = []

    def check(name: str, run) -> None:
        """A row: ok, FAIL with the first line of the reason, or skipped (a run that returns (result, "skipped"))."""
        started = time.perf_counter()
        try:
            result, status = run(), "ok"
            if isinstance(result, tuple):
                result, status = result
        except Exception as e:  # a row's failure is reported in the table; the other rows still run
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result, status = f"{type(e).__name__}: {reason}", "FAIL"
        rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
                     "result": result})
        print(f"[{status}] {name}: {result}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiny = build_tiny_model(tmp / "tiny")
        check("gpu-marked tests", lambda: _pytest_gpu(options.dry_run))
        bf16 = {} if options.dry_run else {"bf16": True}
        check("bf16 LoRA SFT → merged → reload + generate", lambda: trained_and_served(
            tmp, "lora", tiny, {}, {**bf16, "weights_dtype": "bfloat16" if bf16 else "float32"}))
        check("full fine-tuning, fp32 master weights, bf16 compute", lambda: trained_and_served(
            tmp, "full", tiny, {"adapter": "full"}, {**bf16, "weights_dtype": "float32"}))
        check("QLoRA 4-bit nf4 train + merge", lambda: trained_and_served(tmp, "qlora", tiny, {"adapter": "qlora"}, {}))
        check("DeepSpeed ZeRO-3 on one device", lambda: trained_and_served(
            tmp, "zero3", tiny, {"distributed": "zero3", "processes_per_host": "1"}, {"distributed": "zero3"}))
        check("padding-free packing", lambda: trained_and_served(
            tmp, "packing", tiny, {"packing": "true"}, {"packing": True}))
        big, params = build_llama(tmp / "llama-1b", tiny, options.dry_run)
        check(f"throughput, {params / 1e9:.2f}B Llama, LoRA", lambda: throughput(big, params, "lora", options.dry_run))
        check(f"throughput, {params / 1e9:.2f}B Llama, full", lambda: throughput(big, params, "full", options.dry_run))

    print(f"\ngpu-check on {card} (torch {torch.__version__})")
    print("| check | status | seconds | result |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {row['status']} | {row['seconds']} | {row['result']} |")
    if options.out:
        Path(options.out).write_text(json.dumps({"device": card, "rows": rows}, indent=2))
    return sum(row["status"] == "FAIL" for row in rows)


def _pytest_gpu(dry_run: bool):
    """The gpu-marked tests' summary line. On a GPU they must run: all of them skipped is a failure. On the
    CPU (a dry run) they skip, and the row says so rather than passing."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests" / "gpu"), "-p",
                             "no:cacheprovider"], capture_output=True, text=True, timeout=900, cwd=REPO)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    if result.returncode != 0:
        raise RuntimeError(summary)
    if " passed" not in summary:
        if dry_run:
            return summary, "skipped"
        raise RuntimeError(f"no gpu test ran: {summary}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
