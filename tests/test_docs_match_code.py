"""docs/methods.md and docs/benchmarks.md describe what the code registers and uses.

Each registered method has a section in docs/methods.md that names every searched
hyperparameter of its search space with the space's default and range, and links its paper
or official code; each registered benchmark has a section in docs/benchmarks.md that states
the code's epochs, learning rate, batch size and data-root variable.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mtl_tune.registry import available_balancers, available_benchmarks, benchmark_class
from mtl_tune.spaces import load_space

DOCS = Path(__file__).resolve().parents[1] / "docs"


def section(doc: Path, heading: str) -> str:
    """The text under ``heading`` (an exact heading line) up to the next heading of that level."""
    text = doc.read_text(encoding="utf-8")
    level = heading.split(" ", 1)[0]
    start = text.find("\n" + heading + "\n")
    assert start >= 0, f"{doc.name} has no section {heading!r}"
    body = text[start + len(heading) + 2:]
    end = re.search(rf"\n{re.escape(level)} |\n#{{1,{len(level) - 1}}} ", body)
    return body[: end.start()] if end else body


def number_forms(value: float) -> set[str]:
    """How a number may be written in the docs: 0.025, 1e-4, 100, 1.0."""
    forms = {f"{value:g}", repr(value)}
    if isinstance(value, float):
        forms |= {re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{value:.0e}").replace("e+", "e")}
    if float(value).is_integer():
        forms.add(str(int(value)))
    return forms


def mentions_number(text: str, value: float) -> bool:
    # trailing zeros after a decimal point are the same number (0.3830 = 0.383)
    return any(re.search(rf"(?<![\d.]){re.escape(f)}{'0*' if '.' in f else ''}(?![\d])", text)
               for f in number_forms(value))


@pytest.mark.parametrize("method", available_balancers())
def test_method_section_states_search_space_and_sources(method: str) -> None:
    text = section(DOCS / "methods.md", f"### `{method}`")
    assert "github.com/" in text, f"{method}: link the official code (at a commit where known)"
    # a paper page: arXiv, OpenReview, or the publisher's (PMLR proceedings, a DOI) for papers with neither
    papers = ("arxiv.org", "openreview.net", "proceedings.mlr.press", "doi.org/")
    assert any(p in text for p in papers) or "no paper" in text.lower() or "preprint" in text, \
        f"{method}: link the paper"
    for p in load_space(method).searchable():
        assert p.name in text, f"{method}: the searched hyperparameter {p.name!r} is not described"
        if p.type in ("float", "int"):
            for what, value in (("default", p.default), ("low", p.low), ("high", p.high)):
                if value is not None:
                    assert mentions_number(text, value), f"{method}: {p.name} {what} {value} not in its section"


@pytest.mark.parametrize("bench", available_benchmarks())
def test_benchmark_section_states_the_code_defaults(bench: str) -> None:
    cls = benchmark_class(bench)
    text = section(DOCS / "benchmarks.md", f"## `{bench}`")
    for key in ("epochs", "lr", "batch_size"):
        if key in cls.defaults:
            assert mentions_number(text, cls.defaults[key]), f"{bench}: {key} = {cls.defaults[key]} not stated"
    if cls.data_env:
        assert cls.data_env in text, f"{bench}: name the data-root variable {cls.data_env}"
    for spec in cls.metrics:
        if spec.primary and spec.baseline is not None and len(cls.metrics) <= 11:
            assert mentions_number(text, spec.baseline), f"{bench}: STL baseline of {spec.name} not stated"


def test_number_forms() -> None:
    assert {"0.0001", "1e-4"} <= number_forms(1e-4)
    assert mentions_number("lr 1e-4, StepLR", 1e-4) and not mentions_number("lr 1e-45", 1e-4)
    assert mentions_number("batch 256", 256) and not mentions_number("batch 2560", 256)
    assert mentions_number("mIoU 0.3830", 0.383) and not mentions_number("0.3831", 0.383)
