"""The README and docs/ stand alone: every relative link and every file path they cite resolves
to a file or directory inside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("mulo", "parametrizations", "experiments", "configs", "tests", "docs", ".ci")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:" + "|".join(re.escape(t) for t in TOP) + r")/[^`\s]*)`")


def inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves_inside_the_repository(doc):
    text = doc.read_text()
    links = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]
    assert doc.name != "README.md" or links, "the README links to its files"
    for target in links:
        path = (doc.parent / target.split("#")[0]).resolve()
        assert inside_repo(path), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_file_exists(doc):
    for cited in CODE_PATH.findall(doc.read_text()):
        if re.search(r"[<>*{}$]", cited):  # a pattern such as runs/<time>/, not a file
            continue
        path = ROOT / cited.rstrip("/").split("::")[0]
        assert path.exists(), f"{doc.name} cites a missing file: {cited}"


def test_no_reference_to_documents_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        for word in ("SPEC", "DESIGN.md", "../shared", "the issue"):
            assert word not in text, f"{doc.name} refers to {word!r}, which a reader cannot see"
