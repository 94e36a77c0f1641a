"""What README.md and docs/*.md name exists: every relative link resolves to a file (and its
``#anchor`` to a heading of it, as GitHub makes anchors), every dotted ``gaugefix.`` name
imports, every repository path written in backticks exists, every ``make`` target and pip
extra named is defined in the Makefile and pyproject.toml, and the README's operation counts of
a training step are those the code dispatches."""

from __future__ import annotations

import functools
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
DOTTED = re.compile(r"\bgaugefix(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"`((?:src|tests|benchmarks|examples|docs)/[^`\s]+)`")
MAKE = re.compile(r"`make ([a-z]+)`")  # in prose; in a code block, a line "make X"
MAKE_LINE = re.compile(r"^make ([a-z]+)", re.MULTILINE)
EXTRAS = re.compile(r"^\[project\.optional-dependencies\]\n(.*?)^\[", re.MULTILINE | re.DOTALL)
EXTRA = re.compile(r"(?:gaugefix|'\.)\[([a-z,]+)\]")
EXTERNAL = ("http://", "https://", "mailto:")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of the headings of a Markdown text (outside code blocks); a repeated
    heading's later anchors get ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(FENCE.sub("", text)):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(document: Path) -> list[str]:
    """The relative links of ``document`` whose file or anchor does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", document.read_text())):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            bad.append(f"{target}: no such heading")
    return bad


def resolves(name: str) -> bool:
    """Whether dotted ``name`` is an importable module or an attribute of one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def ids(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("document", DOCUMENTS, ids=ids)
def test_every_relative_link_resolves(document):
    assert broken_links(document) == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=ids)
def test_every_gaugefix_name_imports(document):
    names = sorted({n.rstrip(".") for n in DOTTED.findall(document.read_text())})
    assert [n for n in names if not resolves(n)] == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=ids)
def test_every_repository_path_exists(document):
    paths = set(PATH.findall(document.read_text()))
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []


def test_make_targets_and_extras_exist():
    text = "".join(d.read_text() for d in DOCUMENTS)
    blocks = "".join(FENCE.findall(text))
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, re.MULTILINE))
    named_targets = set(MAKE.findall(text)) | set(MAKE_LINE.findall(blocks))
    assert {"demo", "test", "bench", "reproduce"} <= named_targets <= targets
    section = EXTRAS.search((ROOT / "pyproject.toml").read_text()).group(1)
    extras = set(re.findall(r"^([a-z]+) = \[", section, re.MULTILINE))
    named = {e for group in EXTRA.findall(text) for e in group.split(",")}
    assert named and named <= extras, named - extras


def test_the_checks_can_fail(tmp_path):
    other = "# Other page\n\n## A section (`x`)\n\n```\n# Not one\n```\n"
    (tmp_path / "other.md").write_text(other)
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n[a](other.md#a-section-x) [b](other.md#not-one) [c](missing.md) [d](#top) "
        "[e](#gone) [f](https://example.com/x)\n"
    )
    assert broken_links(page) == [
        "other.md#not-one: no such heading",
        "missing.md: no such file",
        "#gone: no such heading",
    ]
    assert anchors("## Twice\n## Twice\n") == {"twice", "twice-1"}
    assert resolves("gaugefix.kernels.rescale_") and resolves("gaugefix.GaugeFixing")
    assert not resolves("gaugefix.kernels.no_such_name") and not resolves("gaugefix.nope")


# The README's table of what a training step dispatches in the kernels' GPU layout (GPT-2 with
# a ReLU MLP): its first column, counted again now (a count does not depend on the width).
OPS_ROWS = {
    "added by an exact orbit step": "exact_added",
    "added by the penalty gradient": "penalty_added",
    "`imbalance_stats`": "imbalance_stats",
}


@functools.cache
def gpt2_counts() -> dict:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT))
    from benchmarks.opcount import counts, gpt2

    return counts(gpt2(2, 64), 50257)


def readme_count(row: str) -> int:
    match = re.search(rf"^\| {re.escape(row)} \| (\d+) ", README.read_text(), re.MULTILINE)
    assert match, row
    return int(match.group(1))


@pytest.mark.parametrize("row", list(OPS_ROWS))
def test_readme_operation_counts_match_the_code(row):
    assert gpt2_counts()[OPS_ROWS[row]] == readme_count(row)
