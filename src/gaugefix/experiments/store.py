"""The results store: one SQLite file holding every run, its curves and the analyses.

Each run is written in one transaction together with its curves, so an interrupted sweep loses at
most the runs in progress, and a run's key (its canonical configuration, including the hash of its
task) is unique, so re-running a sweep never duplicates one. Several processes may write one store:
SQLite serialises them, and a writer that waits longer than ``timeout`` seconds gets a
:class:`StoreBusy` error. Processes sweeping one store share the work through *claims*: a run is
claimed (by host, process id and a lease that its owner keeps renewing) before it is trained, and a
claim whose process died, or whose lease ran out, may be taken over. Every problem opening a store
is a :class:`StoreError` whose message names the file.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gaugefix.experiments.engine import RunResult

# The store format, kept in SQLite's ``user_version``. Format 1 (``user_version`` 0, gaugefix
# 0.1.0) keyed runs without the hash of their task; its stores can be read but not extended.
FORMAT = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    task TEXT NOT NULL, task_hash TEXT NOT NULL, method TEXT NOT NULL, optimizer TEXT NOT NULL,
    lr REAL NOT NULL, strength REAL NOT NULL, s REAL NOT NULL, seed INTEGER NOT NULL,
    batch_size INTEGER NOT NULL, steps INTEGER NOT NULL, dtype TEXT NOT NULL,
    status TEXT NOT NULL, initial_loss REAL, final_loss REAL, test_loss REAL,
    accuracy REAL, test_accuracy REAL, log_ratio_rms REAL, mu_rel_max REAL,
    diverged_at INTEGER, balance_change REAL, seconds REAL NOT NULL,
    gaugefix_version TEXT NOT NULL, torch_version TEXT NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS curves (
    run_id INTEGER NOT NULL REFERENCES runs(id), step INTEGER NOT NULL,
    loss REAL, log_ratio_rms REAL, mu_rel_max REAL,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE IF NOT EXISTS analyses (
    name TEXT PRIMARY KEY, value TEXT NOT NULL, seconds REAL NOT NULL,
    gaugefix_version TEXT NOT NULL, torch_version TEXT NOT NULL, created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    expires REAL NOT NULL
);
"""
LEASE = 60.0  # seconds a claim lives unless its owner renews it (every LEASE / 4 s)


class StoreError(RuntimeError):
    """A store that cannot be opened, read or written; the message names the file and why."""


class StoreBusy(StoreError):
    """Another process held the store's lock for longer than the timeout."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> tuple[str, str]:
    from gaugefix import __version__

    return __version__, torch.__version__


class Store:
    """A results store at ``path``: created with its tables when missing, unless ``readonly``
    (then it must exist, and nothing in it or next to it is ever modified)."""

    def __init__(self, path: str | Path, timeout: float = 60.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no store at {self.path}")
            self._check_format(self._query, writing=False)
            return
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise StoreError(f"{parent} is a file, not a results directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(
                f"cannot create the results directory {parent}: {err.strerror}"
            ) from None
        with self._write() as db:
            if db.execute("SELECT 1 FROM sqlite_master").fetchone():
                self._check_format(lambda sql: db.execute(sql).fetchall(), writing=True)
            else:
                db.execute(f"PRAGMA user_version = {FORMAT}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _check_format(self, query: Callable[[str], list], writing: bool) -> None:
        """Refuse a store this version cannot read (or, when ``writing``, extend)."""
        version = query("PRAGMA user_version")[0][0]
        if version > FORMAT:
            raise StoreError(
                f"{self.path} has store format {version}, newer than this gaugefix's ({FORMAT}); "
                "upgrade gaugefix to use it"
            )
        tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"runs", "curves", "analyses"} <= tables:
            raise StoreError(f"{self.path} is an SQLite file but not a gaugefix results store")
        if version < FORMAT and writing:
            rows = query("SELECT gaugefix_version FROM runs ORDER BY id DESC LIMIT 1")
            by = f"gaugefix {rows[0][0]}" if rows else "an earlier gaugefix"
            raise StoreError(
                f"{self.path} was written by {by} (store format {max(version, 1)}, whose run keys "
                f"do not cover the data and model); `gaugefix report {self.path.parent}` still "
                "reads it, but new runs need a new results directory"
            )

    def _connect(self) -> sqlite3.Connection:
        try:
            if self.readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                db = sqlite3.connect(uri, timeout=self.timeout, isolation_level=None, uri=True)
            else:
                db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as err:
            raise self._error(err) from None
        db.row_factory = sqlite3.Row
        return db

    def _error(self, err: sqlite3.Error) -> StoreError:
        """The one-line error for an SQLite failure on this store."""
        if isinstance(err, sqlite3.OperationalError) and "unable to open" in str(err):
            if self.path.is_dir():
                return StoreError(f"cannot open {self.path}: it is a directory")
            if not os.access(self.path.parent, os.W_OK):
                return StoreError(f"cannot create {self.path}: {self.path.parent} is not writable")
            return StoreError(f"cannot open {self.path}: {err}")
        return StoreError(f"{self.path} is not a readable gaugefix results store: {err}")

    def _query(self, sql: str, args: Any = ()) -> list[sqlite3.Row]:
        """The rows of one read-only statement."""
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as err:
            if "locked" in str(err):
                raise StoreBusy(f"the store {self.path} is locked by another process") from err
            raise self._error(err) from None
        except sqlite3.DatabaseError as err:
            raise self._error(err) from None
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; raises :class:`StoreBusy` if the lock cannot be had in time."""
        db = self._connect()
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                if "locked" not in str(err):
                    raise self._error(err) from None
                raise StoreBusy(
                    f"the store {self.path} is locked by another process (waited "
                    f"{self.timeout:.0f} s); try again when it finishes"
                ) from err
            except sqlite3.DatabaseError as err:
                raise self._error(err) from None
            try:
                yield db
            except BaseException as err:
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(err, sqlite3.DatabaseError):
                    raise self._error(err) from None
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- runs -----------------------------------------------------------------------------------
    def finished_keys(self) -> set[str]:
        return {row[0] for row in self._query("SELECT key FROM runs")}

    def add_run(self, result: RunResult, seconds: float) -> bool:
        """Write one run and its curves in one transaction; ``False`` if it was already there."""
        c = result.config
        gv, tv = _versions()
        row = {
            **asdict(c),
            "key": c.key(),
            "status": result.status,
            "seconds": seconds,
            "initial_loss": result.initial_loss,
            "final_loss": result.final_loss,
            "test_loss": result.test_loss,
            "accuracy": result.accuracy,
            "test_accuracy": result.test_accuracy,
            "log_ratio_rms": result.log_ratio_rms,
            "mu_rel_max": result.mu_rel_max,
            "diverged_at": result.diverged_at,
            "balance_change": result.balance_change,
            "gaugefix_version": gv,
            "torch_version": tv,
            "created": _now(),
        }
        columns = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE key = ?", (row["key"],))
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (row["key"],)).fetchone():
                return False
            run_id = db.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", row).lastrowid
            db.executemany(
                "INSERT INTO curves VALUES (?, ?, ?, ?, ?)",
                [(run_id, *point) for point in result.curves],
            )
        return True

    # -- claims ---------------------------------------------------------------------------------
    def claim(self, keys: list[str], claimant: Claimant) -> list[str] | None:
        """Claim the runs ``keys`` that are not finished, all or none, in one transaction:
        ``None`` (nothing claimed) when another live claimant holds one of them, else the keys
        now claimed (empty when every run is finished)."""
        now = time.time()
        with self._write() as db:
            todo = db.execute(
                "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT key FROM runs)",
                (json.dumps(keys),),
            ).fetchall()
            todo = [r[0] for r in todo]
            held = db.execute(
                "SELECT owner, host, pid, expires FROM claims "
                "WHERE key IN (SELECT value FROM json_each(?))",
                (json.dumps(todo),),
            )
            if any(r[0] != claimant.id and _alive(r[1], r[2], r[3], now) for r in held):
                return None
            db.executemany(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                [(k, claimant.id, claimant.host, claimant.pid, now + claimant.lease) for k in todo],
            )
        return todo

    def renew(self, claimant: Claimant) -> None:
        """Extend the lease of every claim of ``claimant``."""
        with self._write() as db:
            db.execute(
                "UPDATE claims SET expires = ? WHERE owner = ?",
                (time.time() + claimant.lease, claimant.id),
            )

    def release(self, claimant: Claimant) -> None:
        """Drop every claim of ``claimant`` (its runs not written become free)."""
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE owner = ?", (claimant.id,))

    def claims(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM claims ORDER BY key")]

    def runs(self, **where: Any) -> list[dict[str, Any]]:
        """Stored runs as dicts, optionally filtered by equality on columns."""
        clause = " AND ".join(f"{k} = :{k}" for k in where)
        sql = "SELECT * FROM runs" + (f" WHERE {clause}" if clause else "") + " ORDER BY id"
        return [dict(r) for r in self._query(sql, where)]

    def curves(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM curves WHERE run_id = ? ORDER BY step", (run_id,))
        return [dict(r) for r in rows]

    # -- analyses ---------------------------------------------------------------------------------
    def put_analysis(self, name: str, value: Any, seconds: float, replace: bool = False) -> None:
        """Store an analysis result under ``name`` (kept if already there, unless ``replace``)."""
        gv, tv = _versions()
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._write() as db:
            db.execute(
                f"{verb} INTO analyses VALUES (?, ?, ?, ?, ?, ?)",
                (name, json.dumps(value), seconds, gv, tv, _now()),
            )

    def analysis(self, name: str) -> Any | None:
        rows = self._query("SELECT value FROM analyses WHERE name = ?", (name,))
        return json.loads(rows[0][0]) if rows else None

    def analyses(self) -> dict[str, Any]:
        return {r[0]: json.loads(r[1]) for r in self._query("SELECT name, value FROM analyses")}

    def seconds(self) -> float:
        """Compute time recorded for everything in the store."""
        runs = self._query("SELECT COALESCE(SUM(seconds), 0) FROM runs")[0][0]
        more = self._query("SELECT COALESCE(SUM(seconds), 0) FROM analyses")[0][0]
        return float(runs + more)


def _alive(host: str, pid: int, expires: float, now: float) -> bool:
    """Whether a claim still holds: its lease runs, and, on this host, its process exists."""
    if expires < now:
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Claimant:
    """One sweep's identity in the claims of ``store``: host, process id and a random id. In a
    ``with`` block a background thread renews its claims every ``lease / 4`` seconds; leaving
    the block releases every claim it still holds."""

    def __init__(self, store: Store, lease: float = LEASE) -> None:
        self.store, self.lease = store, lease
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 4):
            with suppress(StoreError):  # busy for a while: the next renewal comes in time
                self.store.renew(self)

    def __enter__(self) -> Claimant:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with suppress(StoreError):  # unreleased claims expire with their lease
            self.store.release(self)
