"""Every document a source file or doc cites exists in the repository, with the cited section.

A citation is a ``*.md`` path, optionally followed by ``#anchor`` (the project's syntax:
``docs/methods.md#cagrad``) or by ``§ section`` (accepted so that an old-style citation is
checked too, not skipped). The path is resolved against the citing file's folder (Markdown
links) and against the repository root (citations in source files); one of the two must be
a file of the repository. An anchor must be the GitHub slug of a heading of that file; a ``§``
section must begin a heading (``§3.2`` ↔ ``## 3.2 …``). A name that is only a file the
program writes (``report.md``) or a path being built (``tmp_path / "x.md"``, ``--out x.md``)
is not a citation.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("mtl_tune", "toy", "bench", "tests", "examples", "search_spaces", "analysis", "scripts",
                "docs", "cluster", ".ci")
SCANNED_ROOT_FILES = ("README.md", "pyproject.toml", "setup.py")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ipynb", ".sh", ".cfg", ".txt"}
SKIPPED_PARTS = {"__pycache__", ".venv", "node_modules", ".git", "toy_outputs", ".pytest_cache"}
#: file names the program writes (outputs, not documents of the repository)
GENERATED = {"report.md": "python -m mtl_tune.analyze", "table.md": "python -m toy.trajectories"}

CITATION = re.compile(
    r"(?<![\w/.${}-])"                                   # start of a token (not inside a path or URL)
    r"((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)*\.md)"          # the path
    r"(?:#([^\s)\]`'\",;:]+)|[ \t]?§[ \t]?([\w.]+))?"  # optional #anchor or § section
)
PATH_BUILT = re.compile(r"(--out[ =]|/ *[\"'])$")   # `--out x.md`, `tmp / "x.md"`: a path made, not cited


@dataclass(frozen=True)
class Citation:
    source: Path
    line: int
    path: str
    anchor: str | None
    section: str | None

    def __str__(self) -> str:
        where = f"#{self.anchor}" if self.anchor else f" §{self.section}" if self.section else ""
        return f"{self.source.relative_to(ROOT)}:{self.line}: {self.path}{where}"


def find_citations(text: str, source: Path) -> list[Citation]:
    """The document citations in ``text`` (the contents of ``source``)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in CITATION.finditer(line):
            path = m.group(1)
            if PATH_BUILT.search(line[: m.start()]) or Path(path).name in GENERATED and "/" not in path:
                continue
            anchor = m.group(2).rstrip(".") if m.group(2) else None
            section = m.group(3).rstrip(".") if m.group(3) else None
            found.append(Citation(source, number, path, anchor, section))
    return found


def slug(heading: str) -> str:
    """GitHub's heading anchor: drop links' targets and punctuation, lower case, spaces → '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


@cache
def headings(doc: Path) -> tuple[tuple[str, ...], frozenset[str]]:
    """(heading texts, anchors) of a Markdown file; headings inside code fences are not headings."""
    texts, anchors, seen = [], set(), {}
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        text = m.group(1)
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        texts.append(text)
        anchors.add(base if n == 0 else f"{base}-{n}")
    return tuple(texts), frozenset(anchors)


def problem(c: Citation) -> str | None:
    """Why ``c`` cannot be followed, or None when it can."""
    candidates = [(c.source.parent / c.path).resolve(), (ROOT / c.path).resolve()]
    target = next((p for p in candidates if p.is_file() and p.is_relative_to(ROOT)), None)
    if target is None:
        return f"{c}: no file {c.path!r} in the repository"
    if c.anchor is not None and c.anchor not in headings(target)[1]:
        return f"{c}: {target.relative_to(ROOT)} has no heading with anchor #{c.anchor}"
    if c.section is not None:
        texts = headings(target)[0]
        if not any(re.match(re.escape(c.section) + r"(?![\w])", t.strip("`* ")) for t in texts):
            return f"{c}: {target.relative_to(ROOT)} has no section §{c.section}"
    return None


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_ROOT_FILES if (ROOT / name).is_file()]
    for folder in SCANNED_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and not SKIPPED_PARTS & set(path.parts):
                files.append(path)
    return [f for f in files if f != Path(__file__).resolve()]  # this file cites bad examples on purpose


def test_checker_rejects_out_of_repo_citations_and_accepts_good_ones() -> None:
    source = ROOT / "mtl_tune" / "balancers" / "example.py"
    text = ("spec: methods.md §1.2 and peers.md B.5\n"
            "see docs/methods.md#cagrad, [x](../../docs/benchmarks.md#qm9) and docs/methods.md#no-such-heading\n"
            "out = tmp_path / \"step.md\"; python bench/x.py --out docs/perf/new.md; writes report.md\n"
            "https://github.com/org/repo/blob/main/README.md and docs/reliability.md § Security\n")
    cites = find_citations(text, source)
    assert [(c.path, c.anchor, c.section) for c in cites] == [
        ("methods.md", None, "1.2"), ("peers.md", None, None), ("docs/methods.md", "cagrad", None),
        ("../../docs/benchmarks.md", "qm9", None), ("docs/methods.md", "no-such-heading", None),
        ("docs/reliability.md", None, "Security")]
    verdicts = [problem(c) for c in cites]
    assert "no file 'methods.md'" in verdicts[0] and "no file 'peers.md'" in verdicts[1]
    assert verdicts[2] is None and verdicts[3] is None and verdicts[5] is None
    assert "no heading with anchor #no-such-heading" in verdicts[4]


def test_slug_follows_github() -> None:
    assert slug("3. Choices versus the official code") == "3-choices-versus-the-official-code"
    assert slug("`cagrad`") == "cagrad"
    assert slug("Δm% and mean rank") == "δm-and-mean-rank"
    assert slug("Plug-ins: methods and [benchmarks](x.md)") == "plug-ins-methods-and-benchmarks"


def test_every_cited_document_exists_with_its_section() -> None:
    start = time.perf_counter()
    files = scanned_files()
    assert len(files) > 100, "the scan found too few files: wrong root?"
    cites = [c for f in files for c in find_citations(f.read_text(encoding="utf-8", errors="replace"), f)]
    assert len(cites) > 50, "the scan found too few citations: is the pattern broken?"
    problems = [p for c in cites if (p := problem(c))]
    assert not problems, "citations that a reader cannot follow:\n" + "\n".join(problems)
    assert time.perf_counter() - start < 10  # generous bound for a loaded CI machine; ~0.2 s here
