"""Streaming text is decoded incrementally (a window of recent tokens, not the whole output each step):
its pieces must join to exactly what one decode of the whole output gives, multi-byte characters split
across tokens included, and stop sequences must be found wherever the new text completes them."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from serve.batcher import Sequence, _first_stop_end, _new_text

SMOLLM2 = Path(__file__).resolve().parents[2] / ".cache" / "models" / "SmolLM2-135M-Instruct"
texts = st.lists(st.sampled_from(["a", "b", " ", ".", ",", "\n", "é", "ß", "✓", "日本", "😀", "  ", "Dana's"]),
                 max_size=30).map("".join)


def streamed(tokenizer, ids):
    s = Sequence(request=None, prompt_ids=[], max_new_tokens=len(ids), emit=None)
    pieces = []
    for token in ids:
        s.generated.append(token)
        pieces.append(_new_text(tokenizer, s))
    return pieces


def check_joins_to_the_whole_decode(tokenizer, ids):
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    joined = "".join(streamed(tokenizer, ids))
    if whole.endswith("\ufffd"):  # the output stops inside a character: that character is never emitted
        assert whole.startswith(joined)
    else:
        assert joined == whole


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


@pytest.mark.smollm2
@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_pieces_join_to_the_whole_decode_with_smollm2(text):
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    check_joins_to_the_whole_decode(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def test_a_character_split_across_tokens_is_emitted_once_complete(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a😀b", add_special_tokens=False)
    pieces = streamed(tiny_tokenizer, ids)
    assert "".join(pieces) == "a😀b" and "😀" in pieces and not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize(("text", "new", "stops", "end"), [
    ("hello END", 2, ("END",), 9),          # completed by the last two characters
    ("hello END more", 5, ("END",), None),  # already searched on an earlier step
    ("xxSTOPxxEND", 11, ("END", "STOP"), 6),  # the earliest of several
    ("abc", 0, ("c",), None),               # nothing new, nothing to find
])
def test_stop_sequences_are_found_where_the_new_text_completes_them(text, new, stops, end):
    assert _first_stop_end(text, new, stops) == end
