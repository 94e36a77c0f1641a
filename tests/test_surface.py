"""The package's surface: what ``import gaugefix`` pulls in, matplotlib's global state, the
exception hierarchy and the command without its extras."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

import gaugefix
from gaugefix.__main__ import COMMAND_EXTRA, extra_requirements, main

COMMAND_ONLY = ("matplotlib", "sklearn", "typer", "tqdm")
LIBRARY_MODULES = (
    "gaugefix",
    "gaugefix.checkpoint",
    "gaugefix.distributed",
    "gaugefix.zoo",
    "gaugefix.integrations.common",
)

_BLOCKED_IMPORT = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"blocked: {{name}}")

sys.meta_path.insert(0, Block())
for module in {modules!r}:
    __import__(module)
print(sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED)))
"""


def test_the_library_imports_without_the_command_dependencies():
    """``import gaugefix`` (and its library submodules) works with matplotlib, scikit-learn,
    typer and tqdm unimportable, and imports none of them."""
    code = _BLOCKED_IMPORT.format(blocked=COMMAND_ONLY, modules=LIBRARY_MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_changes_matplotlibs_global_state():
    """Importing every gaugefix module, the report's included, leaves the backend as it was
    and never imports pyplot."""
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import gaugefix.cli, gaugefix.report, gaugefix.experiments.analyses\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "False"]


def all_modules() -> list:
    """Every module of the package, imported (the optional backends' modules included: they
    import their backend lazily)."""
    names = [m.name for m in pkgutil.walk_packages(gaugefix.__path__, "gaugefix.")]
    return [importlib.import_module(name) for name in ["gaugefix", *names]]


def test_every_exception_is_a_gaugefix_error_exported_from_gaugefix():
    """Every exception class defined in the package derives from ``GaugefixError`` and from a
    built-in exception, and ``gaugefix`` exports it (``gaugefix.<Name>`` resolves to it)."""
    found = {
        obj
        for module in all_modules()
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__.startswith("gaugefix")
    }
    assert len(found) >= 10
    for error in found:
        assert issubclass(error, gaugefix.GaugefixError), error
        builtins = (ValueError, RuntimeError, OSError)
        assert error is gaugefix.GaugefixError or issubclass(error, builtins), error
        assert error.__name__ in gaugefix.__all__, error
        assert getattr(gaugefix, error.__name__) is error


def test_the_command_without_its_extras_says_what_to_install(monkeypatch, capsys):
    version = metadata.version

    def without_typer(name: str) -> str:
        if name == "typer":
            raise metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(metadata, "version", without_typer)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs typer," in err and "pip install 'gaugefix[cli]'" in err


ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60  # a function fits on one screen


def test_no_function_in_src_is_longer_than_a_screen():
    """Every function and method in ``src/gaugefix``, decorators excluded, has at most
    :data:`MAX_LINES` lines (docstring and comments included)."""
    root = Path(gaugefix.__file__).parent
    long = set()
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_LINES:
                    long.add((path.relative_to(root).as_posix(), node.name))
    assert not long, sorted(long)


def test_the_command_checks_the_distributions_of_its_extra():
    """What the command checks is read from pyproject.toml's extras, written once there."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        out = set()
        for requirement in extras[extra]:
            if requirement.startswith("gaugefix["):
                out |= names(requirement.removeprefix("gaugefix[").removesuffix("]"))
            else:
                out.add(requirement.split(">")[0].split("=")[0].split("<")[0])
        return out

    assert set(extra_requirements(COMMAND_EXTRA)) == names(COMMAND_EXTRA)
    assert {"typer", "tqdm", "matplotlib", "scikit-learn"} <= names(COMMAND_EXTRA)


def test_every_module_declares_its_public_names():
    """Each module of the package has ``__all__``, and every name in
    every ``__all__``, ``gaugefix.__all__`` included, resolves."""
    undeclared = {m.__name__ for m in all_modules() if not hasattr(m, "__all__")}
    assert not undeclared, sorted(undeclared)
    for module in all_modules():
        for name in getattr(module, "__all__", ()):
            assert getattr(module, name, None) is not None, f"{module.__name__}.{name}"
