"""The package's surface: what ``import gaugefix`` pulls in, matplotlib's global state, the
exception hierarchy and the command without its extras."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import gaugefix
from gaugefix.__main__ import main
from gaugefix.checkpoint import CheckpointError
from gaugefix.experiments.ray_executor import ClusterError
from gaugefix.experiments.store import StoreBusy, StoreError
from gaugefix.experiments.tasks import TaskError

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


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (gaugefix.TracingError, RuntimeError),
        (gaugefix.ValueDependentError, RuntimeError),
        (gaugefix.SingularGramError, ValueError),
        (CheckpointError, ValueError),
        (TaskError, ValueError),
        (StoreError, RuntimeError),
        (StoreBusy, RuntimeError),
        (ClusterError, RuntimeError),
        (gaugefix.ShardingError, ValueError),
    ],
)
def test_every_exception_is_a_gaugefix_error_and_keeps_its_builtin_base(error, builtin):
    assert issubclass(error, gaugefix.GaugefixError) and issubclass(error, builtin)
    assert "GaugefixError" in gaugefix.__all__ and "SingularGramError" in gaugefix.__all__


def test_the_command_without_its_extras_says_what_to_install(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "typer" else find_spec(name)
    )
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "needs typer," in err and "pip install 'gaugefix[cli]'" in err
