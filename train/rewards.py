"""GRPO's rewards: how much a sampled answer reads as the person's, in TRL's reward-function shape.

GRPO (TRL's GRPOTrainer) samples num_generations answers to each prompt, scores each one, and moves the model
towards the answers that score above their group's mean. The scores are train/voice.py's measures, one function
per *_reward_weight hyperparameter (a weight of 0 leaves its function out); TRL adds them up, weighted, and logs
each one's mean as rewards/<name>/mean (`rewards_style_mean=...` in the job's log lines):

    style       1 - the style distance between the answer and the profile of ALL the person's training answers
                (how often they use "I", "just", "—", "!"...), computed once. Topic-free: it rewards the person's
                function-word and punctuation habits whatever the prompt. The profile is the whole training
                set's, as a single real answer is too short to carry a reliable one.
    overlap     unigram F1 between the answer and the person's real answer to the same prompt (the row's
                `reference` column): saying what the person said, in the words they used.
    length      closeness of the answer's word count to the real answer's, exp(-|ln(ours/theirs)|), i.e. the
                shorter over the longer (0 for an empty answer): writing as much as the person does, where a
                sampled answer tends to stop short or ramble on to max_completion_length.
    repetition  -(1 - distinct word pairs / word pairs): a penalty, at most 0, for loops such as "the the the"
                (0 for answers under 2 words). The other rewards can pay for a loop (a repeated function word
                pulls the style profile, a repeated topic word the overlap); this takes it back.

Each function is called as fn(prompts, completions, **columns) and returns one float per completion.
Completions are strings, or, with conversational prompts (as here), lists of messages whose last one is the
answer. No torch here.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import partial

from train.config import TrainConfig
from train.data import DataError
from train.voice import distinct_2, profile, unigram_f1, words


def grpo_rows(rows: list[dict]) -> list[dict]:
    """SFT rows → GRPO's: the prompt messages, and the person's answer as text (`reference`) for the rewards."""
    if any("completion" not in row for row in rows):
        raise DataError("method=grpo needs conversation rows in the 'train' channel ({\"instruction\", \"output\"}, "
                        "{\"prompt\", \"completion\"} or {\"messages\"}): plain {\"text\"} rows have no prompt to "
                        "answer and no answer of the person's to compare with")
    return [{"prompt": row["prompt"], "reference": row["completion"][-1]["content"]} for row in rows]


def answer_text(completion) -> str:
    """A completion as TRL passes it: a string, or a list of messages ending with the answer."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def profile_distance(ours: Counter, theirs: Counter) -> float:
    """voice.style_distance on profiles already counted: total variation distance in [0, 1]."""
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    if not total_ours or not total_theirs:
        return 1.0 if total_ours != total_theirs else 0.0
    return 0.5 * sum(abs(ours[k] / total_ours - theirs[k] / total_theirs) for k in set(ours) | set(theirs))


def style(prompts, completions, person: Counter, **columns) -> list[float]:
    return [max(0.0, 1.0 - profile_distance(profile([answer_text(c)]), person)) for c in completions]


def overlap(prompts, completions, reference: list[str], **columns) -> list[float]:
    return [unigram_f1(answer_text(c), real) for c, real in zip(completions, reference)]


def length(prompts, completions, reference: list[str], **columns) -> list[float]:
    scores = []
    for c, real in zip(completions, reference):
        ours, theirs = len(words(answer_text(c))), len(words(real))
        scores.append(math.exp(-abs(math.log(ours / theirs))) if ours and theirs else 0.0)
    return scores


def repetition(prompts, completions, **columns) -> list[float]:
    texts = [answer_text(c) for c in completions]
    return [-(1.0 - distinct_2([text])) if len(words(text)) >= 2 else 0.0 for text in texts]


def reward_functions(config: TrainConfig, person_answers: list[str]) -> tuple[list, list[float]]:
    """The reward functions with a weight above 0, and their weights (GRPOConfig.reward_weights), in one order.
    `person_answers`: all the person's training answers, whose profile the style reward compares with."""
    weighted = ((style, config.style_reward_weight), (overlap, config.overlap_reward_weight),
                (length, config.length_reward_weight), (repetition, config.repetition_reward_weight))
    functions, weights = [], []
    for function, weight in weighted:
        if weight:
            # TRL names a partial after the function it wraps: the log shows rewards/style/mean
            functions.append(partial(style, person=profile(person_answers)) if function is style else function)
            weights.append(weight)
    return functions, weights
