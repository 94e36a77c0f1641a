"""File-system faults that hold for root too (the tests may run as root, whom ``chmod`` does not
stop): every Python-level open of a file under a directory for writing fails as on a read-only
file system, or opens a file whose every write fails as on a full disk."""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
from pathlib import Path

import pytest

WRITE_MODES = set("wxa+")


def _under(path: object, directory: Path, pattern: str = "*") -> bool:
    """``path`` is under ``directory`` and its name matches ``pattern``."""
    if not isinstance(path, str | os.PathLike):
        return False  # a file descriptor
    path = Path(os.path.abspath(path))
    return path.is_relative_to(directory.resolve()) and fnmatch.fnmatch(path.name, pattern)


class FullDiskFile:
    """A file opened on a full disk: it exists, but no byte can be written to it."""

    def __init__(self, file: io.IOBase) -> None:
        self._file = file

    def write(self, data: bytes | str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _patch_open(
    monkeypatch: pytest.MonkeyPatch, directory: Path, fault: str, pattern: str = "*"
) -> None:
    real_open, real_mkdir = builtins.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if not (WRITE_MODES & set(mode) and _under(file, directory, pattern)):
            return real_open(file, mode, *args, **kwargs)
        if fault == "read-only":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return FullDiskFile(real_open(file, mode, *args, **kwargs))

    def fake_mkdir(path, *args, **kwargs):
        if fault == "read-only" and _under(path, directory):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def read_only(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Make ``directory`` (and everything under it) read-only for this test."""
    _patch_open(monkeypatch, directory, "read-only")


def full_disk(monkeypatch: pytest.MonkeyPatch, directory: Path, pattern: str = "*") -> None:
    """Put ``directory`` on a full disk for this test: files can be created, not written (only
    the files whose names match ``pattern``; ``*.png*``: the disk fills at the first figure,
    written directly or through a temporary file)."""
    _patch_open(monkeypatch, directory, "full", pattern)


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too) with its content."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
