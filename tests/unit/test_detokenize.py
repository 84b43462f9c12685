"""details.tokens texts are decoded incrementally (a window of recent tokens, not the whole output for each
token): they must join to exactly the engine's text, multi-byte characters split across tokens
included, and a stop sequence that ends inside a token cuts the texts where the engine's text ends."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from serve.translate import token_texts

SMOLLM2 = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"
texts = st.lists(st.sampled_from(["a", "b", " ", ".", ",", "\n", "é", "ß", "✓", "日本", "😀", "  ", "Dana's"]),
                 max_size=30).map("".join)


def check_joins_to_the_whole_decode(tokenizer, ids):
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = token_texts(tokenizer.decode, ids, whole)
    assert len(pieces) == len(ids) and "".join(pieces) == whole


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_pieces_join_to_the_whole_decode_of_encoded_text(tiny_tokenizer, text):
    check_joins_to_the_whole_decode(tiny_tokenizer, tiny_tokenizer.encode(text, add_special_tokens=False))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 599), max_size=40))
def test_pieces_join_to_the_whole_decode_of_random_tokens(tiny_tokenizer, ids):
    """What a random model emits: any token after any other, partial UTF-8 sequences included."""
    check_joins_to_the_whole_decode(tiny_tokenizer, ids)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2)


@pytest.mark.smollm2
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_pieces_join_to_the_whole_decode_with_smollm2(smollm2_tokenizer, text):
    check_joins_to_the_whole_decode(smollm2_tokenizer, smollm2_tokenizer.encode(text, add_special_tokens=False))


def test_a_character_split_across_tokens_is_given_to_the_token_that_completes_it(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a😀b", add_special_tokens=False)
    pieces = token_texts(tiny_tokenizer.decode, ids, "a😀b")
    assert "".join(pieces) == "a😀b" and "😀" in pieces and not any("\ufffd" in piece for piece in pieces)


def test_a_stop_sequence_inside_a_token_cuts_the_texts_where_the_answer_ends(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hello world again", add_special_tokens=False)
    pieces = token_texts(tiny_tokenizer.decode, ids, "hello wor")  # the engine stopped at "wor"
    assert "".join(pieces) == "hello wor" and pieces[-1] == ""
