"""A person's raw writing becomes clean, deduplicated passages: each cleaning rule, the splitting, the
duplicates, the skipped documents and their reasons, the errors, the held-out split, and the sample folder."""

import json
from pathlib import Path

import pytest

from train.data import DataError
from train.documents import Document, Passage, estimate_tokens, normalise, read_documents, split_documents
from train.markup import html_to_text, markdown_to_text

SAMPLE = Path(__file__).resolve().parents[2] / "local_test" / "documents"


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def words(n: int, tag: str) -> str:
    """n distinct words, so that no two test paragraphs look alike by accident."""
    return " ".join(f"{tag}{i}" for i in range(n))


def sentences(count: int, length: int, tag: str) -> list[str]:
    return [f"{words(length - 1, f'{tag}{s}x')} end." for s in range(count)]


def texts(documents: list[Document]) -> dict[str, list[str]]:
    return {d.source: [p.text for p in d.passages] for d in documents}


# --- HTML ----------------------------------------------------------------------------------------------
PAGE = """<!DOCTYPE html><html><head><title>My post | Site</title><style>p { color: red }</style>
<script>var tracking = "Subscribe now";</script></head>
<body>
<div id="cookie-banner"><p>We use cookies.</p><button>Accept</button></div>
<header class="site-header"><a href="/">Site name</a></header>
<nav><ul><li><a href="/">Home</a></li><li><a href="/blog">Blog</a></li></ul></nav>
<div class="breadcrumbs">Home &rsaquo; Blog</div>
<main>
<article class="post">
  <header><h1>The title</h1><p class="byline">By me, 5 min read</p></header>
  <p>First   paragraph,
  wrapped in the source.</p>
  <div class="share-buttons"><a>Share on LinkedIn</a></div>
  <div class="canvas-note"><p>Kept: canvas is not nav.</p></div>
  <svg><text>icon text</text></svg>
  <form><input type="email"><button>Subscribe</button></form>
  <noscript>Enable JavaScript</noscript>
  <iframe src="https://video.example"></iframe>
  <section id="comments"><p>Great post!</p></section>
  <footer>Tags: serving</footer>
</article>
<aside><h3>Related posts</h3><p>Another post</p></aside>
<div class="sidebar"><p>Popular posts</p></div>
</main>
<footer><p>Subscribe to my newsletter</p><p>&copy; 2024</p></footer>
</body></html>"""


def test_html_keeps_only_the_article_without_boilerplate():
    assert normalise(html_to_text(PAGE)) == ("The title\n\nFirst paragraph, wrapped in the source.\n\n"
                                             "Kept: canvas is not nav.")


def test_html_without_article_takes_main_then_the_whole_page():
    main = "<body><nav>Menu</nav><main><p>In main.</p><div class='related-posts'>Other</div></main><p>Outside.</p>"
    assert normalise(html_to_text(main)) == "In main."
    page = "<body><div class='menu'>Home</div><div><p>Only text.</p></div><div class='footer'>(c)</div></body>"
    assert normalise(html_to_text(page)) == "Only text."


def test_html_blocks_lists_and_entities():
    page = ("<article><p>Fish &amp; chips &mdash; caf&eacute; &#8220;quoted&#8221;&nbsp;here<br>after break</p>"
            "<ul><li>one</li><li>two <b>bold</b> <em>words</em></li></ul><ol><li>first<li>second</ol>"
            "<blockquote>Quoted</blockquote><table><tr><td>cell</td></tr></table>"
            "<pre>x  =  1\n    y = 2</pre></article>")
    assert normalise(html_to_text(page)).split("\n\n") == [
        "Fish & chips — café “quoted” here", "after break", "- one", "- two bold words", "1. first", "2. second",
        "Quoted", "cell", "x = 1\ny = 2"]


def test_html_dropped_elements_nest():
    page = "<article><div class='nav'><div>inner</div><p>still nav</p></div><div><p>Kept.</p></div></article>"
    assert normalise(html_to_text(page)) == "Kept."


# --- Markdown ------------------------------------------------------------------------------------------
def test_markdown_syntax_becomes_plain_text():
    markdown = """---
title: "Front matter"
tags: [a, b]
---

# Why we *stopped* packing #

We used **bold**, __strong__, _italic_ and `max_seq_length` with snake_case_names.
This line is soft-wrapped. ![a diagram](img.png) See [the docs](https://example.com "Docs") and [a ref][1].

<!-- a comment
over two lines -->
Setext heading
==============

- item *one*
* item two
  continued
2) numbered

> a quote
> on two lines

```python
x = a_b * 2  # **not bold**
```

Text with <span class="x">a tag</span>, <https://example.com>, 5 * 3, \\*stars\\* and &amp;.

***

[1]: https://example.com/ref "Title"
"""
    assert normalise(markdown_to_text(markdown)).split("\n\n") == [
        "Why we stopped packing",
        "We used bold, strong, italic and max_seq_length with snake_case_names. This line is soft-wrapped. "
        "See the docs and a ref.",
        "Setext heading",
        "- item one\n- item two continued\n2. numbered",
        "a quote on two lines",
        "x = a_b * 2 # **not bold**",
        "Text with a tag, https://example.com, 5 * 3, *stars* and &."]


def test_markdown_without_front_matter_keeps_a_leading_rule_as_a_break():
    assert normalise(markdown_to_text("---\n\nText after a rule.\n")) == "Text after a rule."


# --- whitespace ----------------------------------------------------------------------------------------
def test_whitespace_and_unicode_are_normalised():
    raw = "  Cafe\u0301\tand   tea \u200b \r\n\r\n\r\n\r\n   second\t\tparagraph  \n  line two \n\n\n"
    assert normalise(raw) == "Café and tea\n\nsecond paragraph\nline two"


def test_estimate_tokens_is_four_thirds_per_word_rounded_up():
    assert [estimate_tokens(words(n, "w")) for n in (0, 1, 3, 4, 192, 193)] == [0, 2, 4, 6, 256, 258]


# --- files ---------------------------------------------------------------------------------------------
def test_documents_in_path_order_with_subfolders_jsonl_and_no_dotfiles(tmp_path):
    write(tmp_path, "b.txt", words(30, "b"))
    write(tmp_path, "a/z.markdown", f"# Z\n\n{words(30, 'z')}")
    write(tmp_path, "a/page.htm", f"<p>{words(30, 'p')}</p>")
    write(tmp_path, ".hidden.md", words(30, "h"))
    write(tmp_path, ".git/x.md", words(30, "g"))
    write(tmp_path, "notes.pdf", "not read")
    write(tmp_path, "posts.jsonl", "\n".join([json.dumps({"text": f"One {words(25, 'o')}", "title": "Title"}), "",
                                              json.dumps({"text": f"Three {words(25, 'h')}", "url": "x"})]))
    documents, skipped = read_documents(tmp_path, 256)
    assert [d.source for d in documents] == ["a/page.htm", "a/z.markdown", "b.txt", "posts.jsonl:1",
                                             "posts.jsonl:3"]
    assert skipped == []
    assert documents[3].passages == (Passage("posts.jsonl:1", 0, f"Title\n\nOne {words(25, 'o')}"),)
    assert documents[1].passages[0].text == f"Z\n\n{words(30, 'z')}"


def test_a_file_that_is_not_utf8_is_an_error_naming_file_and_byte(tmp_path):
    (tmp_path / "ok.md").write_bytes(b"\xef\xbb\xbf" + words(30, "w").encode())  # a BOM is fine
    (tmp_path / "photo.txt").write_bytes(b"Hello \xff\xd8 world")
    with pytest.raises(DataError, match=r"photo\.txt:1: not UTF-8 .*byte offset 6.*save it as UTF-8"):
        read_documents(tmp_path, 256)
    (tmp_path / "photo.txt").unlink()
    assert read_documents(tmp_path, 256)[0][0].passages[0].text == words(30, "w")


@pytest.mark.parametrize("line, message", [
    ("{not json", r"posts\.jsonl:3: invalid JSON"),
    (json.dumps({"title": "no text"}), r'posts\.jsonl:3: expected an object with a string "text"'),
    (json.dumps({"text": ["a list"]}), r'posts\.jsonl:3: expected an object with a string "text"'),
    (json.dumps(["text"]), r'posts\.jsonl:3: expected an object with a string "text"'),
], ids=["not-json", "no-text", "text-not-a-string", "not-an-object"])
def test_a_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    write(tmp_path, "posts.jsonl", "\n".join([json.dumps({"text": words(30, "w")}), "", line]))
    with pytest.raises(DataError, match=message):
        read_documents(tmp_path, 256)


def test_a_folder_without_document_files_is_an_error_naming_what_it_found(tmp_path):
    write(tmp_path, "export.pdf", "x")
    write(tmp_path, ".DS_Store", "x")
    with pytest.raises(DataError, match=r"no document files \(\.txt, .*\) in .* \(found: export\.pdf\)"):
        read_documents(tmp_path, 256)


# --- boilerplate, passages -----------------------------------------------------------------------------
def test_a_paragraph_in_three_documents_is_boilerplate(tmp_path):
    footer = "Thanks for reading! Forward this to a friend."
    write(tmp_path, "a.md", f"{words(30, 'a')}\n\n{footer}\n\nShared by two.")
    write(tmp_path, "b.md", f"{words(30, 'b')}\n\nthanks for  READING! Forward this to a friend.\n\nShared by two.")
    write(tmp_path, "c.html", f"<p>{words(30, 'c')}</p><p>{footer}</p>")
    documents, _ = read_documents(tmp_path, 256)
    assert texts(documents) == {"a.md": [f"{words(30, 'a')}\n\nShared by two."],
                                "b.md": [f"{words(30, 'b')}\n\nShared by two."], "c.html": [words(30, "c")]}


def read_one(tmp_path: Path, paragraphs: list[str], budget: int) -> list[str]:
    write(tmp_path, "doc.md", "\n\n".join(paragraphs))
    documents, skipped = read_documents(tmp_path, budget)
    assert all(estimate_tokens(p.text) <= budget for d in documents for p in d.passages)
    return texts(documents).get("doc.md", skipped)


def test_paragraphs_are_packed_within_the_budget(tmp_path):
    paragraphs = [words(20, f"p{i}x") for i in range(5)]  # 20 words, 27 tokens each
    assert read_one(tmp_path, paragraphs, 64) == ["\n\n".join(paragraphs[:2]), "\n\n".join(paragraphs[2:4]),
                                                  paragraphs[4]]


def test_a_long_paragraph_splits_between_sentences_then_words(tmp_path):
    parts = sentences(6, 15, "s")  # 90 words; three sentences fit 64 tokens, four do not
    assert read_one(tmp_path, [" ".join(parts)], 64) == [" ".join(parts[:3]), " ".join(parts[3:])]
    long_sentence = words(100, "w")
    passages = read_one(tmp_path, [long_sentence], 64)
    assert [len(p.split()) for p in passages] == [33, 33, 34] and " ".join(passages) == long_sentence


def test_a_heading_goes_with_the_paragraph_after_it(tmp_path):
    parts = sentences(4, 12, "s")  # 48 words: fits 64 tokens alone, not with the heading
    follow = words(30, "f")
    assert read_one(tmp_path, ["Why it matters", " ".join(parts), follow], 64) == [
        "Why it matters\n\n" + " ".join(parts[:3]), f"{parts[3]}\n\n{follow}"]
    first, second = words(40, "a"), words(40, "b")
    assert read_one(tmp_path, [first, "Next section", second], 64) == [first, f"Next section\n\n{second}"]


def test_a_short_last_passage_is_dropped_when_it_cannot_merge(tmp_path):
    first = words(45, "a")  # with the 8 words below: 53 words, 71 tokens
    assert read_one(tmp_path, [first, "Thoughts? Tell me below, I read every reply."], 64) == [first]
    assert read_one(tmp_path, [words(20, "a"), "Thoughts? Tell me below."], 64) == [
        f"{words(20, 'a')}\n\nThoughts? Tell me below."]


def test_budget_must_leave_room_for_a_passage(tmp_path):
    with pytest.raises(ValueError, match="passage_max_tokens must be at least 32"):
        read_documents(tmp_path, 16)


# --- duplicates and skipped documents ------------------------------------------------------------------
A, B, C = words(80, "a"), words(80, "b"), words(80, "c")  # 107 tokens each: one passage each at 128
A_EDITED, B_EDITED, C_EDITED = A.replace("a40", "edited"), B.replace("b40", "edited"), C.replace("c40", "edited")


def test_exact_and_near_duplicate_passages_keep_the_first(tmp_path):
    write(tmp_path, "1-first.md", f"{A}\n\n{B}")
    write(tmp_path, "2-second.html", f"<p>{A_EDITED}</p><p>{C}</p><p>{B}</p>")
    documents, skipped = read_documents(tmp_path, 128)
    assert texts(documents) == {"1-first.md": [A, B], "2-second.html": [C]}
    assert documents[1].passages == (Passage("2-second.html", 0, C),)
    assert skipped == []


def test_an_article_saved_three_times_is_kept_once_not_taken_for_boilerplate(tmp_path):
    write(tmp_path, "blog/post.html", f"<article><h1>Title</h1><p>{A}</p><p>{B}</p></article>")
    write(tmp_path, "medium/post.md", f"# Title\n\n{A}\n\n{B}\n")
    write(tmp_path, "substack/post.txt", f"Title\n\n{A_EDITED}\n\n{B}\n")
    write(tmp_path, "notes.md", f"{C}\n\n{A}\n\n{A}")  # a passage repeated within one document counts too
    documents, skipped = read_documents(tmp_path, 128)
    assert texts(documents) == {"blog/post.html": [f"Title\n\n{A}", B], "notes.md": [C]}
    assert skipped == ["medium/post.md: every passage duplicates blog/post.html",
                       "substack/post.txt: every passage duplicates blog/post.html"]


def test_skipped_documents_say_why(tmp_path):
    """A paragraph in 3 documents would be boilerplate: the texts are built so none is (B is in a.md and b.md)."""
    write(tmp_path, "a.md", f"{A}\n\n{B}")
    write(tmp_path, "b.md", f"{A_EDITED}\n\n{C}\n\n{B}")
    write(tmp_path, "c-copy.md", f"# {A}\n\n{B.upper()}")  # the same text, other formatting
    write(tmp_path, "d-mix.txt", f"{B_EDITED}\n\n{C_EDITED}")  # each passage is elsewhere, the whole is not
    write(tmp_path, "e-lightly-edited.html", f"<h1>A new title</h1><p>{A_EDITED}</p><p>{B}</p>")
    write(tmp_path, "drafts/empty.md", " \n\n \t\n")
    write(tmp_path, "drafts/zero.txt", "")
    write(tmp_path, "nav-only.html", "<nav><a>Home</a></nav><footer>Subscribe to my newsletter</footer>")
    write(tmp_path, "tweet.md", "Shipped it. 31 minutes. No drama.")
    documents, skipped = read_documents(tmp_path, 128)
    assert [d.source for d in documents] == ["a.md", "b.md"]
    assert skipped == [
        "c-copy.md: every passage duplicates a.md",
        "d-mix.txt: every passage duplicates a.md, b.md",
        "drafts/empty.md: empty after cleaning",
        "drafts/zero.txt: empty after cleaning",
        "e-lightly-edited.html: every passage duplicates a.md",
        "nav-only.html: empty after cleaning",
        "tweet.md: too short after cleaning (6 words; a passage needs at least 20)",
    ]


# --- held-out documents --------------------------------------------------------------------------------
DOCUMENTS = [Document(f"d{i}.md", (Passage(f"d{i}.md", 0, "x"), Passage(f"d{i}.md", 1, "y"))) for i in range(10)]


def test_split_documents_holds_out_whole_documents_reproducibly():
    train, held = split_documents(DOCUMENTS, 0.2, seed=7)
    assert len(held) == 2 and sorted(train + held, key=DOCUMENTS.index) == DOCUMENTS
    assert all(d in DOCUMENTS for d in held)  # whole documents, every passage with it
    assert split_documents(DOCUMENTS, 0.2, seed=7) == (train, held)
    assert {tuple(split_documents(DOCUMENTS, 0.2, seed)[1]) for seed in range(10)} != {tuple(held)}
    assert train == [d for d in DOCUMENTS if d not in held]  # path order kept


@pytest.mark.parametrize("documents, fraction, held_out", [
    (DOCUMENTS, 0.01, 1), (DOCUMENTS, 1.0, 9), (DOCUMENTS, 0.0, 0), (DOCUMENTS[:2], 0.5, 1), (DOCUMENTS[:1], 0.5, 0),
    ([], 0.5, 0),
], ids=["at-least-one", "never-all", "none-asked", "two", "one-document", "no-documents"])
def test_split_documents_holds_out_at_least_one_and_never_all(documents, fraction, held_out):
    train, held = split_documents(documents, fraction, seed=0)
    assert len(held) == held_out and len(train) == len(documents) - held_out


# --- the sample folder ---------------------------------------------------------------------------------
CHROME = ["This site uses cookies", "Subscribe to my newsletter", "Share this post", "Share on LinkedIn",
          "Related posts", "Copy link", "- Home", "©", "min read", "Thanks for reading", "you subscribed at",
          "Great post!", "Unsubscribe"]


def test_the_sample_folder_reads_into_clean_passages():
    documents, skipped = read_documents(SAMPLE, 256)
    assert skipped == ["blog/2024-06-one-gpu-many-customers.md: every passage duplicates "
                       "blog/2024-06-one-gpu-many-customers.html", "drafts/untitled.md: empty after cleaning"]
    passages = [p for d in documents for p in d.passages]
    assert 30 <= len(passages) <= 80
    assert max(estimate_tokens(p.text) for p in passages) <= 256
    assert min(len(p.text.split()) for p in passages) >= 20
    assert not [(p.source, phrase) for p in passages for phrase in CHROME if phrase in p.text]
    assert {d.source.split("/")[0] for d in documents} == {"blog", "linkedin", "newsletter", "notes"}
