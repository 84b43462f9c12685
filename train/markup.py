"""HTML and Markdown to plain text for train/documents.py: what a reader sees, without page furniture.

HTML: only the <article> (else <main>, else the page); scripts, styles, nav, header, footer, aside, forms and
elements whose class, id or role names navigation or boilerplate are dropped; block elements end a paragraph.
Markdown: front matter, images, link targets, reference definitions, heading marks, emphasis, HTML comments
and tags are dropped, soft-wrapped lines joined. No torch here.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from html.parser import HTMLParser


# --- HTML ----------------------------------------------------------------------------------------------
DROPPED_TAGS = {"head", "title", "script", "style", "noscript", "template", "svg", "nav", "header", "footer",
                "aside", "form", "button", "iframe", "select", "dialog"}
DROPPED_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "dialog"}
BOILERPLATE_NAMES = re.compile(r"(?<![a-z])(nav|menu|footer|sidebar|cookie|consent|banner|share|sharing|social|"
                               r"subscribe|newsletter-signup|comment|related|breadcrumb|byline|advert|promo|popup)")
BLOCK_TAGS = {"p", "div", "li", "h1", "h2", "h3", "h4", "h5", "h6", "br", "blockquote", "pre", "tr", "section",
              "article", "main", "ul", "ol", "table", "hr", "figure", "figcaption", "dd", "dt", "td", "th"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "source", "wbr", "area", "base", "col", "embed", "track"}


def html_to_text(page: str) -> str:
    """The readable text of a page: only its <article> (else <main>) when it has one, without boilerplate."""
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    for region in ("article", "main", "page"):
        if text := "".join(parser.text[region]).strip():
            return text
    return ""


class _HtmlText(HTMLParser):
    """Collects text three ways at once (inside <article>, inside <main>, the whole page) and skips dropped
    elements by counting the nesting of their tag."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text = {"article": [], "main": [], "page": []}
        self.inside = Counter()  # open article/main/pre elements
        self.skipping: tuple[str, int] | None = None  # (tag, depth) of the dropped element we are inside
        self.lists: list[list] = []  # for each open list: [tag, items so far]

    def handle_starttag(self, tag, attrs):
        if self.skipping:
            if tag == self.skipping[0]:
                self.skipping = (tag, self.skipping[1] + 1)
            return
        if tag not in VOID_TAGS and _dropped(tag, dict(attrs), in_article=self.inside["article"] > 0):
            self.skipping = (tag, 1)
            return
        if tag in ("article", "main", "pre"):
            self.inside[tag] += 1
        if tag in ("ul", "ol"):
            self.lists.append([tag, 0])
        if tag in BLOCK_TAGS:
            self._emit("\n\n")
        if tag == "li":
            self._emit(self._marker())

    def handle_endtag(self, tag):
        if self.skipping:
            if tag == self.skipping[0]:
                depth = self.skipping[1] - 1
                self.skipping = (tag, depth) if depth else None
            return
        if tag in BLOCK_TAGS:
            self._emit("\n\n")
        if tag in ("article", "main", "pre") and self.inside[tag]:
            self.inside[tag] -= 1
        if tag in ("ul", "ol") and self.lists and self.lists[-1][0] == tag:
            self.lists.pop()

    def handle_data(self, data):
        if not self.skipping:
            self._emit(data if self.inside["pre"] else re.sub(r"\s+", " ", data))

    def _marker(self) -> str:
        if not self.lists or self.lists[-1][0] == "ul":
            return "- "
        self.lists[-1][1] += 1
        return f"{self.lists[-1][1]}. "

    def _emit(self, text: str):
        self.text["page"].append(text)
        for region in ("article", "main"):
            if self.inside[region]:
                self.text[region].append(text)


def _dropped(tag: str, attrs: dict, in_article: bool) -> bool:
    if tag == "header" and in_article:  # the article's own header holds its title
        return False
    if tag in DROPPED_TAGS or (attrs.get("role") or "").lower() in DROPPED_ROLES:
        return True
    if tag in ("html", "body", "article", "main"):  # never lose the content to a loose class name
        return False
    names = f"{attrs.get('class') or ''} {attrs.get('id') or ''}".lower()
    return bool(BOILERPLATE_NAMES.search(names))


# --- Markdown ------------------------------------------------------------------------------------------
FRONT_MATTER = re.compile(r"\A(---|\+\+\+)[ \t]*\n.*?^(\1|\.\.\.)[ \t]*$\n?", re.S | re.M)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
FENCE = re.compile(r"^\s*(```|~~~)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*\S+")
HEADING = re.compile(r"^#{1,6}\s+(.*?)(\s+#+)?\s*$")
SETEXT_UNDERLINE = re.compile(r"^(=+|-+)\s*$")
RULE = re.compile(r"^([-*_])(\s*\1){2,}\s*$")
BULLET = re.compile(r"^[-*+]\s+")
NUMBERED = re.compile(r"^(\d+)[.)]\s+")
QUOTE = re.compile(r"^(>\s?)+")
IMAGE = re.compile(r"!\[[^\]]*\](\([^)]*\)|\[[^\]]*\])")
LINK = re.compile(r"\[([^\]]*)\](\([^)]*\)|\[[^\]]*\])")
AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
EMPHASIS = re.compile(r"(?<!\w)[*_]+(?=\S)|(?<=\S)[*_]+(?!\w)")
ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>])")


def markdown_to_text(markdown: str) -> str:
    """Markdown's text as a writer would read it aloud: paragraphs, headings as paragraphs, "- " list items,
    code kept as written."""
    markdown = FRONT_MATTER.sub("", markdown.replace("\r\n", "\n").removeprefix("\ufeff"), count=1)
    blocks: list[list[str]] = [[]]  # paragraphs as lists of lines
    in_code = False
    for raw in HTML_COMMENT.sub("", markdown).split("\n"):
        if FENCE.match(raw):
            in_code = not in_code
            blocks.append([])
            continue
        if in_code:
            blocks[-1].append(raw)
            continue
        line = QUOTE.sub("", raw.strip()).strip()
        if not line or REFERENCE_DEFINITION.match(line):
            blocks.append([])
        elif (heading := HEADING.match(line)) or (SETEXT_UNDERLINE.match(line) and blocks[-1]):
            title = _inline(heading.group(1)) if heading else blocks[-1].pop()
            blocks += [[title], []]
        elif RULE.match(line):
            blocks.append([])
        else:
            _add_line(blocks[-1], line)
    return "\n\n".join("\n".join(lines) for lines in blocks if any(line.strip() for line in lines))


def _add_line(block: list[str], line: str):
    """A list item starts a new line; any other line continues the one before (Markdown's soft wrap)."""
    if bullet := BULLET.match(line):
        block.append("- " + _inline(line[bullet.end():]))
    elif number := NUMBERED.match(line):
        block.append(f"{number.group(1)}. " + _inline(line[number.end():]))
    elif block:
        block[-1] = f"{block[-1]} {_inline(line)}"
    else:
        block.append(_inline(line))


def _inline(text: str) -> str:
    """Inline Markdown to text; code spans keep their content untouched."""
    parts = re.split(r"(`+)(.+?)\1", text)
    out = []
    for i in range(0, len(parts), 3):
        out.append(_inline_prose(parts[i]))
        if i + 2 < len(parts):
            out.append(parts[i + 2])
    return "".join(out).strip()


def _inline_prose(text: str) -> str:
    escaped = []
    text = ESCAPE.sub(lambda m: escaped.append(m.group(1)) or f"\x00{len(escaped) - 1}\x00", text)
    text = LINK.sub(r"\1", IMAGE.sub("", text))
    text = TAG.sub("", AUTOLINK.sub(r"\1", text))
    text = html.unescape(EMPHASIS.sub("", text))
    return re.sub(r"\x00(\d+)\x00", lambda m: escaped[int(m.group(1))], text)
