"""instructions=auto: the person's passages (train/documents.py) get the instruction each one answers.

Instruction backtranslation (Li et al., "Self-Alignment with Instruction Backtranslation", 2023): a teacher
model (the `teacher` channel, teacher_model_id, or the base model) reads each passage and writes the request
a user would make for it. Each pair is then scored by the same model: how much more likely the passage
becomes when it answers its instruction than when it answers a generic request (mean log-probability per
passage token, conditioned minus unconditioned; above 0: the instruction explains the passage). Pairs are
filtered in two steps, both counted in the log:

    checks   the instruction has 3 to 80 words, is a request and not a copy of the passage (at most half of
             its words in a row of five come from the passage), and is written in the passage's script
             (Latin, Cyrillic, CJK...)
    share    of the passages that pass, the best `instructions_keep` by score train (held-out passages are
             only checked: they measure the voice, every one of them counts)

Generation runs through vLLM in a child process (its memory is gone when the child exits, before training
loads anything), or through transformers where vLLM is not installed. The rows are Alpaca rows with their
source file, passage number and score, so the file the job writes trains again as an ordinary `train`
channel. No torch at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from train.data import DataError, content_name
from train.documents import Document

log = logging.getLogger(__name__)

INSTRUCTIONS_FILE = "instructions.jsonl"
VALIDATION_FILE = "instructions_validation.jsonl"
PROMPT_VERSION = 1  # part of the saved rows' name: a new prompt does not reuse rows the old one wrote
MAX_INSTRUCTION_TOKENS = 64
ASK = ("Here is a passage someone wrote:\n\n{passage}\n\n"
       "What request or question is this passage the answer to? Write that request as the person who asked "
       "for it would, in one or two sentences. Reply with the request only.")
GENERIC_REQUEST = "Write something."  # the unconditioned side of the score
_LABEL = re.compile(r"^(request|instruction|question|prompt|user|task)\s*:\s*", re.IGNORECASE)
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Corpus:
    """instructions=auto's input: the documents to train on, the whole documents held out for the voice (none
    when a `validation` channel gives the evaluation rows: then those), and where they came from."""

    channel: str
    train: list[Document]
    held_out: list[Document]
    validation_rows: list[dict] | None = None

    def passages(self) -> list[str]:
        return [p.text for d in self.train + self.held_out for p in d.passages]

    def count(self, documents: list[Document]) -> int:
        return sum(len(d.passages) for d in documents)


@dataclass(frozen=True)
class Teacher:
    """The model that writes the instructions: where from_pretrained finds it, its hub commit (None: a folder)."""

    source: str
    revision: str | None
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        """A hub id, or a folder's content: a model.tar.gz teacher is extracted where a restart's path differs."""
        return content_name(Path(self.source)) if Path(self.source).is_dir() else self.source


def ask(passage: str) -> list[dict]:
    return [{"role": "user", "content": ASK.format(passage=passage)}]


def clean_instruction(raw: str) -> str:
    """The request the teacher wrote, without labels, quotes or anything after its first paragraph."""
    text = raw.strip().split("\n\n")[0].strip()
    text = _LABEL.sub("", text).strip().strip("\"'“”‘’").strip()
    return " ".join(text.split())


def script(text: str) -> str:
    """The writing system most of a text's letters belong to (LATIN, CYRILLIC, CJK, ...); '' with no letters."""
    counts: dict[str, int] = {}
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            family = "CJK" if name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) else name.split(" ")[0]
            counts[family] = counts.get(family, 0) + 1
    return max(counts, key=counts.get) if counts else ""


def check(instruction: str, passage: str) -> str | None:
    """Why a pair fails the checks, or None when it passes."""
    words = _WORD.findall(instruction.lower())
    if len(words) < 3:
        return "instruction under 3 words"
    if len(words) > 80:
        return "instruction over 80 words"
    if script(instruction) != script(passage):
        return "instruction not in the passage's script"
    passage_grams = _grams(_WORD.findall(passage.lower()))
    ours = _grams(words)
    if ours and sum(gram in passage_grams for gram in ours) > len(ours) / 2:
        return "instruction copies the passage"
    return None


def _grams(words: list[str], n: int = 5) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def backtranslate(passages: list[str], engine) -> list[tuple[str, float]]:
    """(instruction, score) for each passage, in order. `engine` has a `tokenizer`, `generate(prompt_ids,
    max_tokens)` (greedy texts) and `mean_logprobs(sequences, starts)` (mean log-probability of each
    sequence's tokens from its start)."""
    tokenizer = engine.tokenizer
    prompts = [_render(tokenizer, ask(p), None) for p in passages]
    instructions = [clean_instruction(text) for text in engine.generate(prompts, MAX_INSTRUCTION_TOKENS)]
    asked = [_render(tokenizer, [_user(i)], p) for i, p in zip(instructions, passages)]
    generic = [_render(tokenizer, [_user(GENERIC_REQUEST)], p) for p in passages]
    sequences = [ids for ids, _ in asked + generic]
    scores = engine.mean_logprobs(sequences, [start for _, start in asked + generic])
    count = len(passages)
    return [(instruction, round(scores[i] - scores[count + i], 4)) for i, instruction in enumerate(instructions)]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _render(tokenizer, messages: list[dict], answer: str | None):
    """Token ids of the conversation as `serve` prompts it; with an answer, (ids, where the answer starts)."""
    asked = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prefix = tokenizer(asked, add_special_tokens=False)["input_ids"]
    if answer is None:
        return prefix
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    if ids[:len(prefix)] != prefix:  # a template that renders the answer's turn differently: the answer alone
        ids = prefix + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, len(prefix)


def select(documents: list[Document], made: list[tuple[str, float]], keep: float | None) -> tuple[list[dict], dict]:
    """The rows to train on and the counts behind them. `made` is in passage order over `documents`; keep=None
    keeps every pair that passes the checks (held-out documents)."""
    passages = [passage for document in documents for passage in document.passages]
    pairs = [(passage, instruction, score) for passage, (instruction, score) in zip(passages, made, strict=True)]
    failed: dict[str, int] = {}
    passing = []
    for passage, instruction, score in pairs:
        reason = check(instruction, passage.text)
        if reason:
            failed[reason] = failed.get(reason, 0) + 1
        else:
            passing.append((passage, instruction, score))
    kept = passing
    if keep is not None and passing:
        best = sorted(passing, key=lambda item: -item[2])[:max(1, math.ceil(keep * len(passing)))]
        chosen = {id(item) for item in best}
        kept = [item for item in passing if id(item) in chosen]  # in document order
    rows = [{"instruction": instruction, "output": passage.text, "source": passage.source, "passage": passage.index,
             "score": score} for passage, instruction, score in kept]
    return rows, {"passages": len(pairs), "failed_checks": failed, "passed": len(passing), "kept": len(rows)}


def digest(train: list[Document], held_out: list[Document], teacher: Teacher, keep: float) -> str:
    """Names the rows made from these passages by this teacher: a restart on the same data reuses them."""
    what = {"train": [[p.source, p.text] for d in train for p in d.passages],
            "held_out": [[p.source, p.text] for d in held_out for p in d.passages],
            "teacher": [teacher.name, teacher.revision], "keep": keep, "prompt": PROMPT_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def max_model_len(passage_max_tokens: int) -> int:
    """The teacher's context: the question around the longest passage (its token estimate may run short) and the
    instruction it writes; capped by the model's own length where the engine is sized."""
    return 8 * passage_max_tokens + 1024


def require_enough(count: int, needed: int, what: str) -> None:
    if count < needed:
        raise DataError(f"instructions=auto: {what} gave {count} training passages; at least {needed} are needed "
                        "(per_device_train_batch_size x gradient_accumulation_steps, one optimizer step): add "
                        "writing, or lower passage_max_tokens to cut it finer")
