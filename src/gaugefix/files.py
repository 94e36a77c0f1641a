"""Output files: each is written whole or not at all.

A file is written to a temporary file in the directory of its target, created like any new file
(mode ``0o666`` less the umask), and renamed over the target once complete; on a failure the
temporary file and any directory made for it are removed, and the target is left as it was. The
target is the path itself, or, for a symbolic link, the file it points to (followed, as
``open`` follows it: the link stays). A directory, device, FIFO or socket is never replaced.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path

from gaugefix.errors import GaugefixError

__all__ = [
    "OutputError",
    "missing_directories",
    "output_target",
    "write_all",
    "write_bytes",
    "write_text",
]

# The characters of the target's name that its temporary file's name keeps: at most 4 bytes
# each, plus the 14 of the dot, the random part and the suffix, within the 255 bytes a file
# name may have (the whole name of a 242-byte target was too long).
TEMP_NAME_CHARS = 48


class OutputError(GaugefixError, OSError):
    """An output file that cannot be written; the message names it and says why."""


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def output_target(path: str | os.PathLike) -> Path:
    """The regular file that writing ``path`` replaces or creates (a symbolic link followed);
    :class:`OutputError` when it is a directory, a device, a FIFO or a socket."""
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {path}: it is a directory; give a file name")
    if not stat.S_ISREG(mode):
        raise OutputError(
            f"cannot write {path}: it is not a regular file (a device, FIFO or socket)"
        )
    return target


def missing_directories(directory: Path) -> list[Path]:
    """The directories of ``directory``'s path that do not exist, deepest first."""
    return [d for d in (directory, *directory.parents) if not d.exists()]


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (see the module), making its missing directories. On an error
    the temporary file and the directories made are removed; an ``OSError`` (a full disk, a
    read-only directory) is raised as an :class:`OutputError` naming ``path``."""
    write_all([(path, lambda: data)])


def write_all(files: Sequence[tuple[str | os.PathLike, Callable[[], bytes]]]) -> None:
    """Write several files all or none: each ``(path, data)`` pair's ``data()`` (called once,
    in order) to a temporary file beside its target, and the temporary files renamed over
    their targets, in order, only once every one is complete; on an error before that, every
    temporary file and directory made is removed and every target is left as it was (a rename
    that fails after others leaves those renamed: one system call each). Two paths
    with one target are an :class:`OutputError`, as is an ``OSError``, naming its path."""
    targets = [output_target(path) for path, _ in files]
    counts = Counter(targets)
    twice = [path for (path, _), t in zip(files, targets, strict=True) if counts[t] > 1]
    if twice:
        raise OutputError(f"cannot write {twice[0]}: it is also another of the files written")
    made = list(dict.fromkeys(d for t in targets for d in missing_directories(t.parent)))
    made.sort(key=lambda d: len(d.parts), reverse=True)  # deepest first
    temps: list[Path] = []
    renamed = 0
    try:
        for (_, data), target in zip(files, targets, strict=True):
            temps.append(_temporary(target, data))
        for temp, target in zip(temps, targets, strict=True):
            os.replace(temp, target)
            renamed += 1
    except BaseException as err:
        for temp in temps:
            with suppress(OSError):
                temp.unlink(missing_ok=True)
        with suppress(OSError):
            for directory in made:
                directory.rmdir()
        if isinstance(err, OSError):
            failed = files[renamed if len(temps) == len(files) else len(temps)][0]
            raise OutputError(f"cannot write {failed}: {_reason(err)}") from None
        raise


def _temporary(target: Path, data: Callable[[], bytes]) -> Path:
    """A new temporary file beside ``target`` (its directories made) holding ``data()``."""
    content = data()
    temp = target.with_name(f".{target.name[:TEMP_NAME_CHARS]}.{secrets.token_hex(4)}.tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(temp, "xb") as f:
        try:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            temp.unlink(missing_ok=True)
            raise
    return temp


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_bytes`."""
    write_bytes(path, text.encode())
