"""instructions=auto's pure parts (train/instructions.py) and backtranslation through transformers on the tiny
model; the vLLM path runs in tests/contract/test_documents_job.py."""

import pytest

from train.data import DataError, to_sft_row
from train.documents import Document, Passage
from train.data import read_jsonl, write_jsonl
from train.instructions import Teacher, backtranslate, check, clean_instruction, digest, require_enough, script, select

PASSAGE = ("We turned packing off for small fine-tuning jobs. The run got slower, the answers got better, and "
           "nobody misses the speed.")


def documents(*texts_per_document: list[str]) -> list[Document]:
    return [Document(f"doc{d}.md", tuple(Passage(f"doc{d}.md", i, text) for i, text in enumerate(texts)))
            for d, texts in enumerate(texts_per_document)]


@pytest.mark.parametrize("raw, cleaned", [
    ("Why did you stop using packing?", "Why did you stop using packing?"),
    ('Request: "Why did you stop using packing?"\n\nThis passage explains...', "Why did you stop using packing?"),
    ("  instruction:   Write a post\n about packing.  ", "Write a post about packing."),
])
def test_the_teachers_request_is_kept_without_labels_quotes_or_commentary(raw, cleaned):
    assert clean_instruction(raw) == cleaned


@pytest.mark.parametrize("instruction, reason", [
    ("Why packing?", "instruction under 3 words"),
    ("word " * 81, "instruction over 80 words"),
    ("Почему вы отключили упаковку последовательностей?", "instruction not in the passage's script"),
    ("We turned packing off for small fine-tuning jobs. The run got slower", "instruction copies the passage"),
    ("Why did you stop packing sequences for small fine-tuning jobs?", None),
])
def test_each_check_names_what_fails(instruction, reason):
    assert check(instruction, PASSAGE) == reason


def test_scripts_are_told_apart():
    assert (script("Hello there"), script("Привет"), script("你好世界"), script("123 !")) == \
        ("LATIN", "CYRILLIC", "CJK", "")


def test_the_best_share_by_score_is_kept_in_document_order_with_the_checks_counted():
    corpus = documents([PASSAGE, PASSAGE + " Again.", PASSAGE + " Third."], [PASSAGE + " Fourth."])
    made = [("Why did you stop packing?", 0.5), ("Why", 2.0), ("Tell me about packing, please.", 0.1),
            ("What changed when packing went off?", 0.9)]
    rows, counts = select(corpus, made, keep=0.5)
    assert [row["instruction"] for row in rows] == ["Why did you stop packing?", "What changed when packing went off?"]
    assert counts == {"passages": 4, "failed_checks": {"instruction under 3 words": 1}, "passed": 3, "kept": 2}
    assert rows[1] == {"instruction": "What changed when packing went off?", "output": PASSAGE + " Fourth.",
                       "source": "doc1.md", "passage": 0, "score": 0.9}
    everything, _ = select(corpus, made, keep=None)  # held-out passages: only the checks
    assert len(everything) == 3
    assert to_sft_row(rows[0], "row 0")["completion"][0]["content"] == PASSAGE  # an ordinary training row


def test_rows_are_named_after_their_passages_and_teacher_and_written_whole(tmp_path):
    corpus = documents([PASSAGE])
    teacher = Teacher("/models/a", None)
    key = digest(corpus, [], teacher, 0.8)
    assert key == digest(documents([PASSAGE]), [], Teacher("/models/a", None), 0.8)
    assert key != digest(documents([PASSAGE + "!"]), [], teacher, 0.8)
    assert key != digest(corpus, [], Teacher("/models/b", None), 0.8)
    assert key != digest(corpus, [], teacher, 0.9)
    rows = [{"instruction": "Ask ünïcode?", "output": PASSAGE}]
    write_jsonl(rows, tmp_path / "rows.jsonl")
    assert read_jsonl(tmp_path / "rows.jsonl") == rows
    assert not list(tmp_path.glob("*.partial"))


def test_a_corpus_too_small_is_refused_with_both_numbers():
    with pytest.raises(DataError, match="gave 3 training passages; at least 16 are needed"):
        require_enough(3, 16, "the 'documents' channel")


def test_backtranslation_through_transformers_gives_an_instruction_and_a_score_per_passage(tiny_model):
    from train.teacher import TransformersEngine

    engine = TransformersEngine(Teacher(str(tiny_model), None))
    made = backtranslate([PASSAGE, "Short one about serving, with a number: 42."], engine)
    assert len(made) == 2
    for instruction, score in made:
        assert isinstance(instruction, str) and "\n\n" not in instruction
        assert isinstance(score, float) and -50 < score < 50
    # the score is conditioned minus unconditioned: the same passage under the generic request scores 0
    from train.instructions import GENERIC_REQUEST, _render

    ids, start = _render(engine.tokenizer, [{"role": "user", "content": GENERIC_REQUEST}], PASSAGE)
    (mean,) = engine.mean_logprobs([ids], [start])
    assert mean < 0
