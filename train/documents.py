"""A person's raw writing (posts, articles, newsletters, notes) → clean, deduplicated passages.

`instructions=auto` reads a channel folder of writing instead of instruction rows; this module turns it into
passages (HTML and Markdown become text in train/markup.py), and train/instructions.py writes an
instruction per passage. Files, subfolders included (dotfiles and other suffixes ignored, but a folder
with no document file at all is an error):

    .txt                 plain text, one document; lines are kept as written
    .md, .markdown       one document; front matter, images, link targets, reference definitions, heading
                         #'s, emphasis markers, HTML comments and tags are dropped, soft-wrapped lines joined
    .html, .htm          one document; only the <article> (else <main>, else the page); the head, scripts,
                         styles, nav, header (but an article's own), footer, aside, forms, buttons, iframes,
                         svg, and elements whose class, id or role names navigation or boilerplate (menu,
                         sidebar, cookie, share, subscribe, ...) are dropped; block elements end a paragraph,
                         list items keep "- " (or "1. " in a numbered list)
    .jsonl               one document per line: {"text"[, "title"]}, the title as its first paragraph;
                         the text is plain text; a document's source is "file.jsonl:<line>"

Files must be UTF-8 (a BOM is fine): anything else, or a bad .jsonl line, is a DataError naming the file
and byte or line, since it may be a binary uploaded by mistake. Text is NFC-normalised, runs of spaces
collapsed, lines stripped, and paragraphs (blank-line separated) kept one blank line apart.

Duplicates keep their first occurrence in path order. A document whose whole text is a near duplicate
of an earlier one's (the same article saved twice, lightly edited: edits shift passage boundaries, so
passages alone would miss it) is skipped first. Then a paragraph (case-folded) found in 3 or more of the
remaining documents, like a newsletter sign-off, is boilerplate and removed from all of them. Passages:
paragraphs are packed greedily up to `passage_max_tokens`, counted with `estimate_tokens` (an estimate, 4/3
tokens per word, not a tokenizer); a paragraph over the budget is split between sentences, a sentence over
it into even runs of words. A passage under 20 words takes the first sentences of the next paragraph where
the budget allows, and a heading or lead-in left at the end of a passage moves on to the next one; a last
passage under 20 words that fits nowhere is dropped. Last, a passage whose normalised words hash like an
earlier passage's, or whose word 5-gram shingles have a Jaccard similarity >= 0.8 with one's, is removed.
Similarity is exact Jaccard over shingle sets, not MinHash; candidates come from an inverted index of
shingles, fast enough for the few thousand passages of one person's writing. A document left with no
passage is skipped with a one-line reason naming it relative to the channel folder.

`local_test/documents/` is a sample: one engineer's blog pages (with their site's boilerplate),
newsletters, posts and notes, a near-duplicate article and an empty draft. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from train.config import MIN_PASSAGE_TOKENS
from train.data import DataError, read_text
from train.markup import html_to_text, markdown_to_text

DOCUMENT_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".jsonl")
MIN_WORDS = 20  # a shorter passage is merged forward, or dropped when last
BOILERPLATE_DOCUMENTS = 3  # a paragraph in this many documents is boilerplate
SHINGLE_WORDS = 5
NEAR_DUPLICATE = 0.8  # Jaccard similarity of shingle sets


@dataclass(frozen=True)
class Passage:
    source: str  # the file's path relative to the channel folder; "posts.jsonl:7" for a .jsonl record
    index: int  # its number within its document, from 0
    text: str


@dataclass(frozen=True)
class Document:
    source: str
    passages: tuple[Passage, ...]


def estimate_tokens(text: str) -> int:
    """An estimate, not a tokenizer: 4/3 tokens per whitespace-separated word, rounded up."""
    return (4 * len(text.split()) + 2) // 3


def read_documents(channel_dir: Path, passage_max_tokens: int) -> tuple[list[Document], list[str]]:
    """Documents in sorted path order (subfolders included, dotfiles ignored), each with at least one passage
    after cleaning and deduplication, and the skipped ones: one line per skipped document, "<source>: <why>"."""
    if passage_max_tokens < MIN_PASSAGE_TOKENS:  # the job's config refuses it first; this guards other callers
        raise ValueError(f"passage_max_tokens must be at least {MIN_PASSAGE_TOKENS}, got {passage_max_tokens}")
    texts = [(source, paragraphs) for path in _document_files(channel_dir)
             for source, paragraphs in _read(path, path.relative_to(channel_dir).as_posix())]
    reasons: dict[str, str] = {}  # why a document was skipped
    distinct = _distinct(texts, reasons)
    boilerplate = _boilerplate(distinct)
    documents, seen = [], _Seen()
    for source, paragraphs in distinct:
        kept = [p for p in paragraphs if _key(p) not in boilerplate]
        passages = _pack(kept, passage_max_tokens)
        unique, originals = _unseen(source, passages, seen)
        if not passages:
            reasons[source] = _why_empty(kept)
        elif not unique:
            reasons[source] = f"every passage duplicates {', '.join(dict.fromkeys(originals))}"
        else:
            documents.append(Document(source, tuple(Passage(source, i, text) for i, text in enumerate(unique))))
    return documents, [f"{source}: {reasons[source]}" for source, _ in texts if source in reasons]


def split_documents(documents: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out `fraction` of the WHOLE documents (not passages), at least one when fraction > 0 and there are
    at least 2 documents, never all of them; reproducible for a seed. Both lists keep path order."""
    if fraction <= 0 or len(documents) < 2:
        return list(documents), []
    count = min(len(documents) - 1, max(1, round(len(documents) * fraction)))
    held = set(random.Random(seed).sample(range(len(documents)), count))
    return ([d for i, d in enumerate(documents) if i not in held], [d for i, d in enumerate(documents) if i in held])


def _why_empty(paragraphs: list[str]) -> str:
    words = sum(len(p.split()) for p in paragraphs)
    if not words:
        return "empty after cleaning"
    return f"too short after cleaning ({words} words; a passage needs at least {MIN_WORDS})"


def _distinct(texts: list[tuple[str, list[str]]], reasons: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Documents whose whole text is not a near duplicate of an earlier one's (checked before boilerplate is
    counted, or an article saved three times would be all boilerplate)."""
    distinct, seen = [], _Seen()
    for source, paragraphs in texts:
        whole = "\n\n".join(paragraphs)
        if len(whole.split()) >= MIN_WORDS and (original := seen.find(whole)):
            reasons[source] = f"every passage duplicates {original}"
            continue
        seen.add(source, whole)
        distinct.append((source, paragraphs))
    return distinct


def _unseen(source: str, passages: list[str], seen: _Seen) -> tuple[list[str], list[str]]:
    """The passages not seen before (now remembered), and the sources of those that were."""
    unique, originals = [], []
    for text in passages:
        if original := seen.find(text):
            originals.append(original)
        else:
            seen.add(source, text)
            unique.append(text)
    return unique, originals


# --- files ---------------------------------------------------------------------------------------------
def _document_files(channel_dir: Path) -> list[Path]:
    files = sorted(p for p in channel_dir.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(channel_dir).parts))
    documents = [p for p in files if p.suffix.lower() in DOCUMENT_SUFFIXES]
    if not documents:
        found = ", ".join(p.relative_to(channel_dir).as_posix() for p in files[:5]) or "nothing"
        raise DataError(f"no document files ({', '.join(DOCUMENT_SUFFIXES)}) in {channel_dir} (found: {found})")
    return documents


def _read(path: Path, source: str) -> list[tuple[str, list[str]]]:
    """(source, paragraphs) for each document in the file."""
    text = read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path, source, text)
    if suffix in (".html", ".htm"):
        return [(source, _paragraphs(html_to_text(text)))]
    if suffix in (".md", ".markdown"):
        return [(source, _paragraphs(markdown_to_text(text)))]
    return [(source, _paragraphs(text))]


def _jsonl(path: Path, source: str, text: str) -> list[tuple[str, list[str]]]:
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number}: expected an object with a string "text" (and an optional "title")')
        title = record.get("title")
        body = f"{title}\n\n{record['text']}" if isinstance(title, str) and title.strip() else record["text"]
        documents.append((f"{source}:{number}", _paragraphs(body)))
    return documents


# --- whitespace and paragraphs ----------------------------------------------------------------------------
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


def normalise(text: str) -> str:
    """NFC, no zero-width characters, runs of spaces and tabs collapsed, lines stripped, at most one blank line."""
    text = unicodedata.normalize("NFC", text).translate(_INVISIBLE).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[^\S\n]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _paragraphs(text: str) -> list[str]:
    return [p for p in normalise(text).split("\n\n") if p]


def _key(paragraph: str) -> str:
    return " ".join(paragraph.casefold().split())


def _boilerplate(texts: list[tuple[str, list[str]]]) -> set[str]:
    counts = Counter(key for _, paragraphs in texts for key in {_key(p) for p in paragraphs})
    return {key for key, count in counts.items() if count >= BOILERPLATE_DOCUMENTS}


# --- passages ------------------------------------------------------------------------------------------
SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n")
SENTENCE_CLOSE = re.compile(r"[.!?…][\"'”’)\]]*$")


def _pack(paragraphs: list[str], budget: int) -> list[str]:
    """Paragraphs packed greedily into passages of at most `budget` estimated tokens (see the docstring)."""
    passages: list[str] = []
    current: list[tuple[str, str]] = []  # (separator before it, text) pieces of the passage being filled
    pending = [("\n\n", p) for p in reversed(paragraphs)]  # a stack: the next piece is last
    while pending:
        piece = pending.pop()
        if _fits(current + [piece], budget):
            current.append(piece)
            continue
        parts = _split(piece, budget) if not _fits([piece], budget) or _words(current) < MIN_WORDS else [piece]
        if len(parts) > 1:
            pending += reversed(parts)
            continue
        carried = [current.pop()] if len(current) > 1 and _dangling(current[-1]) else []
        passages.append(_join(current))  # not empty: a piece that does not fit alone always splits
        current = carried
        pending.append(piece)
    if current and _words(current) >= MIN_WORDS:
        passages.append(_join(current))
    elif current and passages and _fits([("", passages[-1]), *current], budget):
        passages[-1] = _join([("", passages[-1]), *current])
    return passages


def _split(piece: tuple[str, str], budget: int) -> list[tuple[str, str]]:
    """A paragraph into its lines and sentences; a single sentence into runs of words that fit the budget."""
    separator, text = piece
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(text)]
    sentences = [(("\n" if text[start - 1] == "\n" else " ") if start else separator, text[start:end].strip())
                 for start, end in zip(starts, starts[1:] + [len(text)])]
    sentences = [s for s in sentences if s[1]]
    if len(sentences) > 1:
        return sentences
    words = text.split()
    chunks = -(-len(words) // (budget * 3 // 4))  # as few runs as fit, of even length
    bounds = [len(words) * i // chunks for i in range(chunks + 1)]
    return [(separator if i == 0 else " ", " ".join(words[a:b])) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


def _dangling(piece: tuple[str, str]) -> bool:
    """A heading or a lead-in ("Three causes:") at the end of a passage: it belongs with what follows."""
    separator, text = piece
    return separator == "\n\n" and len(text.split()) < MIN_WORDS and not SENTENCE_CLOSE.search(text)


def _fits(pieces: list[tuple[str, str]], budget: int) -> bool:
    return estimate_tokens(" ".join(text for _, text in pieces)) <= budget


def _words(pieces: list[tuple[str, str]]) -> int:
    return sum(len(text.split()) for _, text in pieces)


def _join(pieces: list[tuple[str, str]]) -> str:
    return "".join(separator + text for separator, text in pieces)[len(pieces[0][0]):]


# --- duplicates ----------------------------------------------------------------------------------------
class _Seen:
    """Texts kept so far, to find an earlier exact (same normalised hash) or near (shingle Jaccard) duplicate."""

    def __init__(self):
        self.hashes: dict[str, str] = {}  # hash → source
        self.shingles: list[frozenset] = []
        self.sources: list[str] = []
        self.index: dict[tuple, list[int]] = {}  # shingle → the texts that have it

    def find(self, text: str) -> str | None:
        """The source of the first kept text that `text` duplicates, or None."""
        digest, shingles = _fingerprint(text)
        if digest in self.hashes:
            return self.hashes[digest]
        shared = Counter(i for shingle in shingles for i in self.index.get(shingle, ()))
        near = [i for i, common in shared.items()
                if common / (len(shingles) + len(self.shingles[i]) - common) >= NEAR_DUPLICATE]
        return self.sources[min(near)] if near else None

    def add(self, source: str, text: str):
        digest, shingles = _fingerprint(text)
        self.hashes.setdefault(digest, source)
        for shingle in shingles:
            self.index.setdefault(shingle, []).append(len(self.shingles))
        self.shingles.append(shingles)
        self.sources.append(source)


def _fingerprint(text: str) -> tuple[str, frozenset]:
    """The hash of the case-folded words, and the set of word 5-gram shingles (one shingle for shorter texts)."""
    words = re.findall(r"\w+", text.casefold())
    digest = hashlib.sha1(" ".join(words).encode()).hexdigest()
    return digest, frozenset(tuple(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1)))
