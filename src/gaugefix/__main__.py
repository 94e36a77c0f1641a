"""The ``gaugefix`` command (also ``python -m gaugefix``): the command line of
:mod:`gaugefix.cli`, or a one-line error when the packages it needs beyond the library's are
not installed (``pip install 'gaugefix[cli]'``)."""

import re
import sys
from importlib import metadata

__all__ = ["main"]

COMMAND_EXTRA = "cli"  # the extra of pyproject.toml that installs what the command needs
USAGE_ERROR = 2  # the exit status of the command's one-line errors


def extra_requirements(extra: str) -> list[str]:
    """The distributions gaugefix's optional extra ``extra`` installs, as its installed metadata
    (pyproject.toml) lists them, with the extras it includes (``gaugefix[experiments]``)
    followed; none when gaugefix runs from a source tree without installed metadata."""
    try:
        requirements = metadata.requires("gaugefix") or []
    except metadata.PackageNotFoundError:
        return []
    names = []
    for requirement in requirements:
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", requirement)
        if marker is None or marker.group(1) != extra:
            continue
        nested = re.match(r"gaugefix\[([^\]]+)\]", requirement)
        if nested:
            names += extra_requirements(nested.group(1))
        else:
            names.append(re.match(r"[A-Za-z0-9._-]+", requirement).group())
    return names


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    """Run the command, or exit with one line naming what is missing and how to install it."""
    missing = [name for name in extra_requirements(COMMAND_EXTRA) if not _installed(name)]
    if missing:
        print(
            f"error: the gaugefix command needs {', '.join(missing)}, which gaugefix installs "
            f"with its command-line extra: pip install 'gaugefix[{COMMAND_EXTRA}]'",
            file=sys.stderr,
        )
        raise SystemExit(USAGE_ERROR)
    from gaugefix.cli import app

    app()


if __name__ == "__main__":
    main()
