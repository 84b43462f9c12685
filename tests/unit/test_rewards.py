"""GRPO's rewards (train/rewards.py): each one points the right way on the person's real writing (the demo's
sample data), a weight of 0 leaves its function out, and completions come as strings or as message lists."""

import math
from functools import partial

import pytest

from local_test.tiny_model import SAMPLE_DATA
from train.config import TrainConfig
from train.data import DataError, load_sft_rows
from train.rewards import (answer_text, grpo_rows, length, overlap, profile_distance, repetition, reward_functions,
                           style)
from train.voice import profile, style_distance
from train.voice import words as voice_words  # rewards.length counts words as the voice metrics do

ROWS = grpo_rows(load_sft_rows(SAMPLE_DATA))
HELD, PERSON = ROWS[0], [row["reference"] for row in ROWS[1:]]  # the profile comes from the other answers
UNRELATED = "CERTAINLY!!! HERE IS A COMPREHENSIVE OVERVIEW; SEE SECTION 4 (A) AND SECTION 7 (B) FOR DETAILS!!!"
REPETITIVE = "the the the the the the"


def scores(function, answers: list[str], **columns) -> list[float]:
    return function([HELD["prompt"]] * len(answers), answers, reference=[HELD["reference"]] * len(answers), **columns)


def named(functions) -> list[str]:
    """The names TRL logs the functions under (rewards/<name>/mean): a partial is named after what it wraps."""
    return [getattr(f, "func", f).__name__ for f in functions]


@pytest.mark.parametrize("function", ["style", "overlap", "length"])
def test_the_persons_own_answer_scores_higher_than_an_unrelated_or_a_repetitive_one(function):
    reward = {"style": partial(style, person=profile(PERSON)), "overlap": overlap, "length": length}[function]
    own, unrelated, repetitive = scores(reward, [HELD["reference"], UNRELATED, REPETITIVE])
    assert own > unrelated and own > repetitive, (own, unrelated, repetitive)


def test_the_rewards_are_where_their_docstring_puts_them():
    own, unrelated = scores(overlap, [HELD["reference"], "Zebras juggle quietly."])
    assert own == 1.0 and unrelated == 0.0  # F1 with itself; no word in common
    words = len(voice_words(HELD["reference"]))
    half = " ".join(["word"] * (words // 2))
    twice = " ".join(["word"] * (words * 2))
    half_score, twice_score, empty = scores(length, [half, twice, ""])
    assert math.isclose(twice_score, 0.5) and math.isclose(half_score, (words // 2) / words, rel_tol=0.05)
    assert empty == 0.0
    assert all(0.0 <= s <= 1.0 for s in scores(partial(style, person=profile(PERSON)), [HELD["reference"], "", "!"]))


def test_repetition_penalises_repeated_word_pairs_and_leaves_short_answers_alone():
    own, loop, short, empty = scores(repetition, [HELD["reference"], " ".join([REPETITIVE] * 5), "Yes.", ""])
    assert own > -0.05  # the person rarely repeats a word pair
    assert loop < -0.9  # "the the" over and over: one distinct pair
    assert short == empty == 0.0


def test_message_list_completions_score_as_their_text():
    config = TrainConfig()
    functions, _ = reward_functions(config, PERSON)
    answers = [HELD["reference"], UNRELATED, REPETITIVE, ""]
    messages = [[{"role": "assistant", "content": text}] for text in answers]
    for function in functions:
        assert scores(function, messages) == scores(function, answers), named([function])
    assert answer_text([]) == "" and answer_text("plain") == "plain"


def test_every_weight_above_zero_gives_a_named_function_and_zero_leaves_it_out():
    functions, weights = reward_functions(TrainConfig(), PERSON)
    assert named(functions) == ["style", "overlap", "length", "repetition"] and weights == [1.0, 1.0, 0.5, 1.0]
    functions, weights = reward_functions(TrainConfig(style_reward_weight=0.0, length_reward_weight=0.0,
                                                      repetition_reward_weight=2.0), PERSON)
    assert named(functions) == ["overlap", "repetition"] and weights == [1.0, 2.0]


def test_the_style_reward_compares_with_the_profile_of_all_the_answers_as_the_voice_metric_does():
    for answer in (HELD["reference"], UNRELATED, REPETITIVE, ""):
        expected = style_distance([answer], PERSON)
        assert math.isclose(profile_distance(profile([answer]), profile(PERSON)), expected, abs_tol=1e-12)
        assert math.isclose(scores(partial(style, person=profile(PERSON)), [answer])[0], 1.0 - expected,
                            abs_tol=1e-12)


def test_grpo_rows_carry_the_prompt_and_the_persons_answer_and_refuse_plain_text():
    assert set(HELD) == {"prompt", "reference"} and HELD["prompt"][-1]["role"] == "user"
    with pytest.raises(DataError, match=r"plain \{\"text\"\} rows have no prompt"):
        grpo_rows([{"text": "Lesson 1: measure first."}])
