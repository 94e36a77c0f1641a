"""The results store: one SQLite file holding every run, its curves and the analyses.

Each run is written in one transaction together with its curves, so an interrupted sweep loses at
most the runs in progress, and a run's key (its canonical configuration, including the hash of its
task) is unique, so re-running a sweep never duplicates one. Several processes may write one store:
SQLite serialises them, and a writer that waits longer than ``timeout`` seconds gets a
:class:`StoreBusy` error. Processes sweeping one store share the work through *claims*: a run is
claimed (by host, process id and a lease that its owner keeps renewing) before it is trained, and a
claim whose process died, or whose lease ran out, may be taken over. Every problem opening a store
is a :class:`StoreError` whose message names the file. SQLite stores a NaN as ``NULL``: a float
field that cannot be ``None`` reads it back as NaN, one that can as ``None`` (not measured; the
engine records a value that is not finite so anyway).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import socket
import sqlite3
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gaugefix.errors import GaugefixError
from gaugefix.experiments.engine import CurvePoint, RunConfig, RunResult

__all__ = [
    "FORMAT",
    "Record",
    "StoredRun",
    "RESULT_COLUMNS",
    "CONFIG_COLUMNS",
    "RECORD_COLUMNS",
    "RUN_COLUMNS",
    "CURVE_COLUMNS",
    "SCHEMA",
    "LEASE",
    "StoreError",
    "StoreBusy",
    "Store",
    "Claimant",
]

# The store format, kept in SQLite's ``user_version``. Format 1 (``user_version`` 0) keyed runs
# without the hash of their task; format 2 did not record the constant predictor's loss, which the
# stability definition of format 3 needs; format 3 did not record each run's peak loss (the
# divergence thresholds of format 4) nor whether it was a run of the grid or of a bisection.
# Stores of earlier formats are refused with one line.
FORMAT = 4


def _sql_type(annotation: Any) -> str:
    """The column type of a field: ``TEXT``, ``INTEGER`` or ``REAL``, ``NOT NULL`` unless the
    field may be ``None`` or is a float (SQLite stores NaN as NULL)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else annotation
    sql = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}[base]
    return sql if optional or base is float else f"{sql} NOT NULL"


def _fields(cls: type, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    """The columns of a dataclass or named tuple ``cls``: field name to SQL type."""
    hints = typing.get_type_hints(cls)
    names = cls._fields if hasattr(cls, "_fields") else [f.name for f in dataclasses.fields(cls)]
    return {n: _sql_type(hints[n]) for n in names if n not in leave_out}


class Record(NamedTuple):
    """What the store adds to a run's configuration and result."""

    seconds: float
    gaugefix_version: str
    torch_version: str
    created: str


@dataclasses.dataclass
class StoredRun(RunResult):
    """A run read back from a store: its :class:`RunResult` (``curves`` left empty: they are
    read by :meth:`Store.curves` of ``id``), its row ``id`` and its :class:`Record`."""

    id: int = dataclasses.field(kw_only=True)
    record: Record = dataclasses.field(kw_only=True)


# One row of ``runs``: its key, the configuration, the result (its curve apart) and the record.
RESULT_COLUMNS = _fields(RunResult, leave_out=("config", "curves"))
CONFIG_COLUMNS = _fields(RunConfig)
RECORD_COLUMNS = _fields(Record)
RUN_COLUMNS = {
    "key": "TEXT UNIQUE NOT NULL",
    **CONFIG_COLUMNS,
    **RESULT_COLUMNS,
    **RECORD_COLUMNS,
}
CURVE_COLUMNS = _fields(CurvePoint)


def _create(table: str, columns: list[str]) -> str:
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(columns)})"


def _defs(columns: dict[str, str]) -> list[str]:
    return [f"{name} {sql}" for name, sql in columns.items()]


SCHEMA = [
    _create("runs", ["id INTEGER PRIMARY KEY", *_defs(RUN_COLUMNS)]),
    _create(
        "curves",
        [
            "run_id INTEGER NOT NULL REFERENCES runs(id)",
            *_defs(CURVE_COLUMNS),
            "PRIMARY KEY (run_id, step)",
        ],
    ),
    _create("analyses", ["name TEXT PRIMARY KEY", "value TEXT NOT NULL", *_defs(RECORD_COLUMNS)]),
    _create(
        "claims",
        [
            "key TEXT PRIMARY KEY",
            "owner TEXT NOT NULL",
            "host TEXT NOT NULL",
            "pid INTEGER NOT NULL",
            "expires REAL NOT NULL",
        ],
    ),
]
LEASE = 60.0  # seconds a claim lives unless its owner renews it (every LEASE / 4 s)


class StoreError(GaugefixError, RuntimeError):
    """A store that cannot be opened, read or written; the message names the file and why."""


class StoreBusy(StoreError):
    """Another process held the store's lock for longer than the timeout."""


_SQLITE_READONLY_ROLLBACK = 776  # SQLITE_READONLY | (3 << 8): a hot journal, read-only


def _insert(table: str, row: dict[str, Any], verb: str = "INSERT") -> str:
    """The statement inserting ``row`` (named parameters) into ``table``."""
    return f"{verb} INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"


def _record(seconds: float) -> Record:
    """The record of something written now, computed in ``seconds``."""
    from gaugefix import __version__

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Record(seconds, __version__, torch.__version__, now)


class Store:
    """A results store at ``path``: created with its tables when missing, unless ``readonly``
    (then it must exist, and nothing in it or next to it is ever modified, but for the rollback
    of a transaction that a writer killed midway left, which any next writer would do)."""

    _memory: sqlite3.Connection | None = None  # a snapshot's copy in memory (:meth:`snapshot`)

    def __init__(self, path: str | Path, timeout: float = 60.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no store at {self.path}")
            self._roll_back_killed_writer()
            self._check_format(self._query)
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
                self._check_format(lambda sql: db.execute(sql).fetchall())
            else:
                db.execute(f"PRAGMA user_version = {FORMAT}")
            for statement in SCHEMA:
                db.execute(statement)
            # SQLite opens a file it may not write read-only and says so only at a write: one
            # that changes nothing refuses such a store now, before any work is done for it
            db.execute("DELETE FROM claims WHERE 0")

    def _check_format(self, query: Callable[[str], list]) -> None:
        """Refuse a store of another format than this version's."""
        version = query("PRAGMA user_version")[0][0]
        if version > FORMAT:
            raise StoreError(
                f"{self.path} has store format {version}, newer than this gaugefix's ({FORMAT}); "
                "upgrade gaugefix to use it"
            )
        tables = {r[0] for r in query("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"runs", "curves", "analyses"} <= tables:
            raise StoreError(f"{self.path} is an SQLite file but not a gaugefix results store")
        if version < FORMAT:
            rows = query("SELECT gaugefix_version FROM runs ORDER BY id DESC LIMIT 1")
            by = f"gaugefix {rows[0][0]}" if rows else "an earlier gaugefix"
            raise StoreError(
                f"{self.path} was written by {by} in store format {max(version, 1)}, which lacks "
                f"what this gaugefix's definitions need (format {FORMAT}): its "
                "report.md stays as written; run the experiments again into a new results directory"
            )
        missing = _missing_columns(query)
        if missing:
            raise StoreError(
                f"{self.path} is an SQLite file but not a gaugefix results store (no column "
                f"{', '.join(missing[:3])})"
            )

    def _roll_back_killed_writer(self) -> None:
        """Roll back the transaction that a writer killed midway left in the store's journal, as
        its next writer would (a read-only connection cannot, and reads nothing until it is)."""
        reader = self._connect()
        try:
            reader.execute("PRAGMA schema_version").fetchone()
            return
        except sqlite3.Error as err:
            if getattr(err, "sqlite_errorcode", 0) != _SQLITE_READONLY_ROLLBACK:
                raise self._error(err) from None
        finally:
            reader.close()
        try:
            writer = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                writer.execute("PRAGMA schema_version").fetchone()  # rolls the journal back
            finally:
                writer.close()
        except sqlite3.Error as err:
            raise StoreError(
                f"cannot read {self.path}: a process writing it was killed midway, and only a "
                f"process that may write it can roll back what it left ({err})"
            ) from None

    def snapshot(self) -> Store:
        """A read-only copy of the store as it is now, in memory: what other processes write
        later never shows in it, so a report reads one state of the store throughout."""
        copy = sqlite3.connect(":memory:", isolation_level=None)
        source = self._connect()
        try:
            source.backup(copy)
        except sqlite3.DatabaseError as err:
            copy.close()
            raise self._error(err) from None
        finally:
            if source is not self._memory:
                source.close()
        copy.row_factory = sqlite3.Row
        frozen = object.__new__(Store)
        frozen.path, frozen.timeout, frozen.readonly = self.path, self.timeout, True
        frozen._memory = copy
        return frozen

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            return self._memory
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
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF  # the primary result code
        if code == sqlite3.SQLITE_READONLY:
            return StoreError(f"cannot write {self.path}: it is read-only ({err})")
        if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            return StoreError(f"cannot write {self.path}: {err}")
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
            if db is not self._memory:
                db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; raises :class:`StoreBusy` if the lock cannot be had in time."""
        if self.readonly:
            raise StoreError(f"cannot write {self.path}: it was opened read-only")
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
        row = {
            "key": result.config.key(),
            **dataclasses.asdict(result.config),
            **{k: getattr(result, k) for k in RESULT_COLUMNS},
            **_record(seconds)._asdict(),
        }
        with self._write() as db:
            db.execute("DELETE FROM claims WHERE key = ?", (row["key"],))
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (row["key"],)).fetchone():
                return False
            run_id = db.execute(_insert("runs", row), row).lastrowid
            points = [{"run_id": run_id, **point._asdict()} for point in result.curves]
            if points:
                db.executemany(_insert("curves", points[0]), points)
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

    def runs(self, **where: Any) -> list[StoredRun]:
        """The stored runs in the order they were written, optionally only those whose
        configuration has the given values (``method="plain", s=1.0``)."""
        unknown = sorted(set(where) - set(CONFIG_COLUMNS))
        if unknown:
            raise ValueError(f"runs can be selected by {', '.join(CONFIG_COLUMNS)}, not {unknown}")
        clause = " AND ".join(f"{k} = :{k}" for k in where)
        sql = "SELECT * FROM runs" + (f" WHERE {clause}" if clause else "") + " ORDER BY id"
        return [_stored_run(row) for row in self._query(sql, where)]

    def curves(self, run_id: int) -> list[CurvePoint]:
        """The recorded steps of the run with row id ``run_id``."""
        rows = self._query("SELECT * FROM curves WHERE run_id = ? ORDER BY step", (run_id,))
        return [CurvePoint(**_values(CurvePoint, CURVE_COLUMNS, row)) for row in rows]

    # -- analyses ---------------------------------------------------------------------------------
    def put_analysis(self, name: str, value: Any, seconds: float, replace: bool = False) -> None:
        """Store an analysis result under ``name`` (kept if already there, unless ``replace``)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        row = {"name": name, "value": json.dumps(value), **_record(seconds)._asdict()}
        with self._write() as db:
            db.execute(_insert("analyses", row, verb), row)

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


# The columns a store of this format has in each table that every version reads.
TABLE_COLUMNS = {"runs": RUN_COLUMNS, "curves": CURVE_COLUMNS, "analyses": ("name", "value")}


def _missing_columns(query: Callable[[str], list]) -> list[str]:
    """The columns of :data:`TABLE_COLUMNS` that a database's tables lack, as ``table.column``
    (another program's tables of the same names)."""
    missing = []
    for table, columns in TABLE_COLUMNS.items():
        present = {row[1] for row in query(f"PRAGMA table_info({table})")}
        missing += [f"{table}.{name}" for name in columns if name not in present]
    return missing


@functools.cache
def _float_fields(cls: type) -> frozenset[str]:
    """The fields of ``cls`` typed ``float`` (not optional), which SQLite returns as ``NULL``
    where they held a NaN."""
    return frozenset(k for k, hint in typing.get_type_hints(cls).items() if hint is float)


def _values(cls: type, columns: dict[str, str], row: sqlite3.Row) -> dict[str, Any]:
    """The ``columns`` of ``row`` as values of the fields of ``cls`` (``NULL`` floats: NaN)."""
    floats = _float_fields(cls)
    return {k: math.nan if row[k] is None and k in floats else row[k] for k in columns}


def _stored_run(row: sqlite3.Row) -> StoredRun:
    """A row of ``runs`` as the run it records."""
    return StoredRun(
        config=RunConfig(**_values(RunConfig, CONFIG_COLUMNS, row)),
        **_values(RunResult, RESULT_COLUMNS, row),
        id=row["id"],
        record=Record(**_values(Record, RECORD_COLUMNS, row)),
    )


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
