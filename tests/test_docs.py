"""Citations of docs/method.md cannot rot: every one names a section the document has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SECTION = r"\d+(?:\.\d+)*"
# "docs/method.md §3.4", "docs/method.md §5.1, §5.2", "docs/method.md §5–§6", "docs/method.md §6.1 and §6.2"
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ipynb", ""}
CITATION = re.compile(rf"docs/method\.md((?:(?:\s+|,\s*|\s*[–-]\s*|\s+and\s+)§{SECTION})*)")


def sections(text: str) -> set[str]:
    """Section numbers of the document's headings: "## 3. The head" -> 3, "### 3.4 PFA" -> 3.4."""
    return {m.group(1) for m in re.finditer(rf"^#{{2,4}} ({SECTION})\.?\s", text, flags=re.MULTILINE)}


def bad_citations(text: str, known: set[str], where: str) -> list[str]:
    """Citations of a section ``known`` lacks, and mentions of a method.md that is not docs/method.md."""
    bad = []
    for m in re.finditer(r"method\.md", text):
        line = text.count("\n", 0, m.start()) + 1
        if text[max(0, m.start() - 5) : m.start()] != "docs/":
            quoted = text.splitlines()[line - 1].strip()
            bad.append(f"{where}:{line}: cite the repository's docs/method.md §<section>: {quoted!r}")
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        bad += [
            f"{where}:{line}: docs/method.md has no section §{s}"
            for s in re.findall(SECTION, m.group(1))
            if s not in known
        ]
    return bad


def repository_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    skip = (METHOD, Path(__file__).resolve())  # the document itself, and this file's own examples
    paths = (ROOT / name for name in out)
    return [p for p in paths if p.is_file() and p not in skip and p.suffix in TEXT_SUFFIXES]


def test_method_md_has_numbered_sections():
    known = sections(METHOD.read_text(encoding="utf-8"))
    assert {"1", "3", "3.4", "5.2", "7.1", "8.1", "9"} <= known


def test_every_citation_names_an_existing_section():
    known = sections(METHOD.read_text(encoding="utf-8"))
    files = repository_text_files()
    assert any(p.name == "heads.py" for p in files) and any(p.suffix == ".yaml" for p in files)
    bad = [
        b
        for p in files
        for b in bad_citations(
            p.read_text(encoding="utf-8", errors="replace"), known, str(p.relative_to(ROOT))
        )
    ]
    assert not bad, "\n".join(bad)


def test_the_documents_own_cross_references_exist():
    text = METHOD.read_text(encoding="utf-8")
    known = sections(text)
    missing = sorted({s for s in re.findall(rf"§({SECTION})", text) if s not in known})
    assert not missing, f"docs/method.md refers to sections it does not have: {missing}"


def test_a_stale_citation_is_reported():
    known = {"3", "3.4", "5", "5.1"}
    text = (
        "see docs/method.md §3.4 and docs/method.md §5.1, §5.9\n(method.md 2.4-2.8)\ndocs/method.md §5–§7\n"
    )
    assert bad_citations(text, known, "x.py") == [
        "x.py:2: cite the repository's docs/method.md §<section>: '(method.md 2.4-2.8)'",
        "x.py:1: docs/method.md has no section §5.9",
        "x.py:3: docs/method.md has no section §7",
    ]
