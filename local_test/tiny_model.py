"""A tiny random Llama (2 layers, hidden 64) with a real byte-level BPE tokenizer: training steps take
milliseconds, so tests and benchmarks (bench/chaos_train.py) can run whole jobs many times."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parent / "test_dir" / "input" / "data" / "train"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training rows with short completions, so the tiny model's steps take milliseconds.
TINY_ROWS = [
    {"instruction": f"Write a short note about lesson {i}.", "output": f"Lesson {i}: measure before you optimise."}
    for i in range(8)
]


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on the sample data."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [line for path in sorted(SAMPLE_DATA.glob("*.jsonl")) for line in path.read_text().splitlines()]
    texts += [json.dumps(row) for row in TINY_ROWS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
