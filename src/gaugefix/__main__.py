"""The ``gaugefix`` command (also ``python -m gaugefix``): the command line of
:mod:`gaugefix.cli`, or a one-line error when the packages it needs beyond the library's are
not installed (``pip install 'gaugefix[cli]'``)."""

import importlib.util
import sys

__all__ = ["main"]

# What the command imports beyond the library: the command line itself, the progress bars, the
# report's figures and the digits data set of the experiments.
COMMAND_MODULES = {
    "typer": "typer",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
}
USAGE_ERROR = 2  # the exit status of the command's one-line errors


def main() -> None:
    """Run the command, or exit with one line naming what is missing and how to install it."""
    missing = [
        pkg for module, pkg in COMMAND_MODULES.items() if importlib.util.find_spec(module) is None
    ]
    if missing:
        print(
            f"error: the gaugefix command needs {', '.join(missing)}, which gaugefix installs "
            "with its command-line extra: pip install 'gaugefix[cli]'",
            file=sys.stderr,
        )
        raise SystemExit(USAGE_ERROR)
    from gaugefix.cli import app

    app()


if __name__ == "__main__":
    main()
