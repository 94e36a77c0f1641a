"""The results store: one SQLite file holding every run, its curves and the analyses.

Each run is written in one transaction together with its curves, so an interrupted sweep loses at
most the runs in progress, and a run's key (its canonical configuration) is unique, so re-running
a sweep never duplicates one. Several processes may write one store: SQLite serialises them, and
a writer that waits longer than ``timeout`` seconds gets a :class:`StoreBusy` error.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from gaugefix.experiments.engine import RunResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT UNIQUE NOT NULL,
    task TEXT NOT NULL, method TEXT NOT NULL, optimizer TEXT NOT NULL,
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
"""


class StoreBusy(RuntimeError):
    """Another process held the store's lock for longer than the timeout."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> tuple[str, str]:
    from gaugefix import __version__

    return __version__, torch.__version__


class Store:
    """A results store at ``path`` (created with its tables when missing)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; raises :class:`StoreBusy` if the lock cannot be had in time."""
        db = self._connect()
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise StoreBusy(
                    f"the store {self.path} is locked by another process (waited "
                    f"{self.timeout:.0f} s); try again when it finishes"
                ) from err
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- runs -----------------------------------------------------------------------------------
    def finished_keys(self) -> set[str]:
        db = self._connect()
        try:
            return {row[0] for row in db.execute("SELECT key FROM runs")}
        finally:
            db.close()

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
            if db.execute("SELECT 1 FROM runs WHERE key = ?", (row["key"],)).fetchone():
                return False
            run_id = db.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", row).lastrowid
            db.executemany(
                "INSERT INTO curves VALUES (?, ?, ?, ?, ?)",
                [(run_id, *point) for point in result.curves],
            )
        return True

    def runs(self, **where: Any) -> list[dict[str, Any]]:
        """Stored runs as dicts, optionally filtered by equality on columns."""
        clause = " AND ".join(f"{k} = :{k}" for k in where)
        sql = "SELECT * FROM runs" + (f" WHERE {clause}" if clause else "") + " ORDER BY id"
        db = self._connect()
        try:
            return [dict(r) for r in db.execute(sql, where)]
        finally:
            db.close()

    def curves(self, run_id: int) -> list[dict[str, Any]]:
        db = self._connect()
        try:
            rows = db.execute("SELECT * FROM curves WHERE run_id = ? ORDER BY step", (run_id,))
            return [dict(r) for r in rows]
        finally:
            db.close()

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
        db = self._connect()
        try:
            row = db.execute("SELECT value FROM analyses WHERE name = ?", (name,)).fetchone()
            return None if row is None else json.loads(row[0])
        finally:
            db.close()

    def analyses(self) -> dict[str, Any]:
        db = self._connect()
        try:
            return {r[0]: json.loads(r[1]) for r in db.execute("SELECT name, value FROM analyses")}
        finally:
            db.close()

    def seconds(self) -> float:
        """Compute time recorded for everything in the store."""
        db = self._connect()
        try:
            runs = db.execute("SELECT COALESCE(SUM(seconds), 0) FROM runs").fetchone()[0]
            more = db.execute("SELECT COALESCE(SUM(seconds), 0) FROM analyses").fetchone()[0]
            return float(runs + more)
        finally:
            db.close()
