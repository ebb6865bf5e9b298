"""Relative links in the documentation point at files that exist and, for a Markdown target with
an anchor, at a heading of that file (GitHub's anchors: lowercase, punctuation dropped, spaces to
'-', '-1', '-2', ... for repeated headings). Covers README.md, datasets/README.md, docs/**/*.md
and projects/**/README.md; links inside code (fenced blocks, backticks) are not links."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) or ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def doc_files():
    files = [ROOT / "README.md", ROOT / "datasets" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "projects").rglob("README.md"))
    return [f for f in files if f.is_file()]


def prose_lines(path):
    """The file's lines outside fenced code blocks, with inline code removed."""
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield line


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower()
    kept = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path):
    seen = {}
    out = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path):
    for lineno, line in enumerate(prose_lines(path), 1):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            yield lineno, target


def test_slug_follows_github():
    assert slug("The evidence benchmark: three sets x 4 seeds, val then test") == (
        "the-evidence-benchmark-three-sets-x-4-seeds-val-then-test"
    )
    assert slug("`make demo` timing") == "make-demo-timing"
    assert slug("A first look at synthetic_v2 (val, two seeds)") == (
        "a-first-look-at-synthetic_v2-val-two-seeds"
    )
    assert slug("Several processes (--num-gpus, --num-machines)") == (
        "several-processes---num-gpus---num-machines"
    )


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    cache = {}
    bad = []
    for lineno, target in links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{path.relative_to(ROOT)}: " + "; ".join(bad)
