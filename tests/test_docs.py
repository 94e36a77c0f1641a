"""Every ```python block of README.md and docs/*.md runs, and prints what it says it prints.

The blocks of one file run in order in one namespace (a block may use what an earlier one
defined), in a temporary directory (a block may write files); the default dtype a block sets
(``torch.set_default_dtype(torch.float64)``) and a process group it starts are undone after the
file. A block is run statement by statement, and its line numbers are those of the Markdown
file, so a failure points at the line in the document.

Printed output: a statement followed by comment lines ``# prints: TEXT`` must print exactly
those lines, one ``# prints:`` line per printed line, e.g.

    print(structure.num_generators)
    # prints: 128

What a statement without such comments prints is not checked.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
PRINTS = "# prints:"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line of the block's first line, source)`` for every ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def expected_output(lines: list[str], end: int) -> list[str] | None:
    """The ``# prints:`` lines right after line ``end`` (1-based, of ``lines``), or None."""
    shown = []
    for line in lines[end:]:
        if not line.strip().startswith(PRINTS):
            break
        shown.append(line.strip().removeprefix(PRINTS).strip())
    return shown or None


def run_block(source: str, namespace: dict, filename: str, first_line: int = 1) -> None:
    """Execute ``source`` statement by statement in ``namespace``; where a statement is
    followed by ``# prints:`` lines, its standard output must be those lines."""
    tree = ast.parse(source, filename)
    ast.increment_lineno(tree, first_line - 1)
    lines = source.splitlines()
    for statement in tree.body:
        code = compile(ast.Module([statement], []), filename, "exec")
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(code, namespace)
        shown = expected_output(lines, statement.end_lineno - first_line + 1)
        if shown is not None:
            printed = output.getvalue().rstrip("\n").split("\n")
            assert printed == shown, (
                f"{filename}:{statement.lineno}: printed {printed}, the document shows {shown}"
            )
        else:
            print(output.getvalue(), end="")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(document: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    dtype = torch.get_default_dtype()
    try:
        for first_line, source in python_blocks(document.read_text()):
            run_block(source, namespace, str(document), first_line)
    finally:
        torch.set_default_dtype(dtype)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_every_document_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCUMENTS}
    assert {"README.md", "docs/coordinates.md", "docs/soft_gauge_fixing.md"} <= names


def test_a_block_that_prints_something_else_fails():
    run_block("print(1 + 1)\n# prints: 2\n", {}, "ok.md")
    run_block("for i in range(2):\n    print(i)\n# prints: 0\n# prints: 1\n", {}, "ok.md")
    with pytest.raises(AssertionError, match="printed"):
        run_block("print(1 + 1)\n# prints: 3\n", {}, "wrong.md")
    with pytest.raises(AssertionError, match="printed"):
        run_block("print(1)\nprint(2)\n# prints: 1\n", {}, "wrong.md")


def test_blocks_are_found_with_their_lines():
    text = "intro\n```python\nx = 1\n```\n\n```\nnot python\n```\n```python \ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (10, "y = 2\n")]
