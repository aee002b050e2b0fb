"""The farm's ledger: one durable row per job, on the submitting side (SQLite in WAL mode).

Dask schedules, detects failures and moves data, but keeps nothing once a client goes away. The ledger
is what makes a farm run durable: every job (a spec x an environment x a recipe) has one row, keyed by
a deterministic job key (:func:`pyti_core.farm.FarmJob.key`), holding its state, attempts, worker,
times and, once it arrived and was validated, its report (the JSON-RPC 2.0 raw-data records, in the
shape ``pyti run --report`` writes)::

    pending ──▶ running ──▶ done      the job's records arrived (whatever the tests said)
       ▲           │
       └───────────┴──────▶ failed    no result: its workers kept dying (Dask's KilledWorker), or
                                      the job could not be run at all; ``reason`` says why

``done`` and ``failed`` are final: a rerun with the same ledger skips them (``failed`` ones run again
only when asked). A ``running`` row whose submitter went away is ``pending`` again at the next run.
A result is written once: a second result for a job that is already ``done`` changes nothing, so a job
that ran twice (its first worker was killed after it finished) still has exactly one result.

Only the standard library is used; reading a ledger (``pyti farm status``, ``pyti farm report``) needs
neither Dask nor libvirt. Writers take an exclusive lock (``<ledger>.lock``) so two submitters never
drive the same ledger at once; readers can read while a run writes (WAL).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import attrs

from pyti_core.errors import LedgerError, LedgerInUseError, RawDataError
from pyti_core.manager import RunResult
from pyti_core.rawdata import RawDataRecord, Report

__all__ = [
    "FINAL_STATES",
    "JobState",
    "Ledger",
    "LedgerRow",
]

JobState = Literal["pending", "running", "done", "failed"]
FINAL_STATES: Final = frozenset({"done", "failed"})
_SCHEMA_VERSION: Final = 1
#: The serial console kept per job in the ledger: its last bytes.
SERIAL_KEEP: Final = 64 << 10
#: A result larger than this is refused (a job's records are capped well below it by the guest).
MAX_RESULT_BYTES: Final = 64 << 20

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    environment TEXT NOT NULL,
    recipe TEXT NOT NULL,
    job TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    reason TEXT,
    distribution TEXT,
    ok INTEGER,
    report TEXT,
    phases TEXT,
    timed_out INTEGER,
    serial_tail TEXT
);
"""


@attrs.frozen
class LedgerRow:
    """One job as the ledger knows it. Times are seconds since the epoch (UTC); ``None`` when unknown.

    ``report`` is the job's validated report once it is ``done`` (else ``None``), ``records`` its records;
    ``ok`` is whether every one passed. ``job`` is the job's description as submitted (a JSON object).
    """

    key: str
    spec: str
    environment: str
    recipe: str
    state: JobState
    attempts: int
    worker: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    reason: str | None
    distribution: str | None
    ok: bool | None
    report: Report | None
    phases: Mapping[str, float]
    timed_out: bool
    serial_tail: str
    job: Mapping[str, Any]

    @property
    def records(self) -> tuple[RawDataRecord, ...]:
        return self.report.records if self.report is not None else ()

    def to_result(self) -> RunResult:
        """The job as a :class:`~pyti_core.manager.RunResult`: its records when ``done``; else one
        ``error`` record of task ``pyti`` saying why there are none.
        """
        if self.state == "done" and self.report is not None:
            return RunResult(
                self.report.distribution,
                self.report,
                dict(self.phases),
                self.serial_tail,
                timed_out=self.timed_out,
            )
        why = self.reason or f"the job is {self.state}: it has not finished yet"
        record = RawDataRecord(
            task_id="pyti",
            task="pyti",
            status="error",
            exit_code=None,
            stdout="",
            stderr=f"pyti farm: {why}",
            started_at=datetime.fromtimestamp(self.started_at or self.submitted_at, UTC),
            duration_s=max(0.0, (self.finished_at or 0.0) - (self.started_at or self.finished_at or 0.0)),
            max_rss_kb=0,
            cpu_user_s=0.0,
            cpu_system_s=0.0,
        )
        return RunResult(self.spec, Report(self.spec, (record,)), {}, self.serial_tail)


class Ledger:
    """A farm ledger at ``path`` (created when missing).

    ``Ledger(path)`` opens it for reading and writing; ``lock=True`` also takes the submitter's lock
    (:class:`~pyti_core.errors.LedgerInUseError` when another process holds it). A file that is not a
    pyti ledger raises :class:`~pyti_core.errors.LedgerError`. Methods are safe from several threads.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock: bool = False, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LedgerError(self.path, "no such ledger; `pyti farm run ... --ledger FILE` creates one")
        self._lock = threading.RLock()
        self._lock_fd: int | None = None
        if lock:
            self._take_lock()
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            self._release_lock()
            raise LedgerError(self.path, f"cannot open it: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # a result is on disk once written: the submitter may be killed the next instant
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise LedgerError(self.path, f"not a pyti ledger (or damaged): {exc}") from exc
        except LedgerError:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LedgerError(self.path, f"cannot create its lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise LedgerInUseError(
                self.path, f"another `pyti farm run` (pid {holder}) is using it; wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    def _init_schema(self) -> None:
        with self._lock:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and "jobs" not in tables:
                raise LedgerError(self.path, f"not a pyti ledger: it holds the tables {sorted(tables)}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA_VERSION),))
            elif row[0] != str(_SCHEMA_VERSION):
                raise LedgerError(
                    self.path, f"ledger schema {row[0]} is not the {_SCHEMA_VERSION} this pyti knows"
                )

    def close(self) -> None:
        """Close the database and release the lock; idempotent."""
        with self._lock:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
                self._db = None  # type: ignore[assignment]
            self._release_lock()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise LedgerError(self.path, "the ledger is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- writing ------------------------------------------------------------------------------------

    def add(self, key: str, *, spec: str, environment: str, recipe: str, job: Mapping[str, Any]) -> JobState:
        """Add a job as ``pending`` unless it is known; return its state (``running`` becomes ``pending``:
        a row can only be running while its submitter lives, and the submitter holds the lock).
        """
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (key, spec, environment, recipe, job, state, submitted_at)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                (key, spec, environment, recipe, json.dumps(dict(job), sort_keys=True), time.time()),
            )
            db.execute("UPDATE jobs SET state='pending' WHERE key=? AND state='running'", (key,))
            (state,) = db.execute("SELECT state FROM jobs WHERE key=?", (key,)).fetchone()
        return cast(JobState, state)

    def retry(self, key: str) -> None:
        """Make a ``failed`` job ``pending`` again (its attempts and reason are kept until it runs)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='pending' WHERE key=? AND state='failed'", (key,))

    def started(self, key: str, worker: str, when: float | None = None) -> None:
        """A worker started the job: one more attempt; ``running`` on ``worker`` unless it already ended
        (a start event may arrive after the result of a later attempt).
        """
        with self._tx() as db:
            db.execute("UPDATE jobs SET attempts=attempts+1 WHERE key=?", (key,))
            db.execute(
                "UPDATE jobs SET worker=?, started_at=?, state='running'"
                " WHERE key=? AND state NOT IN ('done', 'failed')",
                (worker, when or time.time(), key),
            )

    def finished(
        self,
        key: str,
        *,
        report: Report,
        phases: Mapping[str, float],
        timed_out: bool,
        serial_tail: str,
        worker: str | None,
    ) -> bool:
        """Store the job's result; ``False`` (and nothing changed) when it already has one."""
        text = report.to_json()
        ok = bool(report.records) and report.ok
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='done', finished_at=?, distribution=?, ok=?, report=?, phases=?,"
                " timed_out=?, serial_tail=?, worker=COALESCE(?, worker), reason=NULL"
                " WHERE key=? AND state != 'done'",
                (
                    time.time(),
                    report.distribution,
                    int(ok),
                    text,
                    json.dumps(dict(phases)),
                    int(timed_out),
                    serial_tail[-SERIAL_KEEP:],
                    worker,
                    key,
                ),
            )
            return cursor.rowcount == 1

    def failed(
        self, key: str, reason: str, *, attempts: int | None = None, worker: str | None = None
    ) -> bool:
        """Mark the job ``failed`` with ``reason``; ``False`` when it is already ``done``."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE jobs SET state='failed', finished_at=?, reason=?, worker=COALESCE(?, worker),"
                " attempts=MAX(attempts, COALESCE(?, 0)) WHERE key=? AND state != 'done'",
                (time.time(), reason, worker, attempts, key),
            )
            return cursor.rowcount == 1

    def release_running(self) -> int:
        """Every ``running`` job back to ``pending`` (its submitter stopped); return how many."""
        with self._tx() as db:
            return db.execute("UPDATE jobs SET state='pending' WHERE state='running'").rowcount

    # -- reading ------------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Jobs by state (every state present, zero when none)."""
        out = dict.fromkeys(("pending", "running", "done", "failed"), 0)
        with self._lock:
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                out[state] = n
        return out

    def rows(self, *, state: JobState | None = None) -> list[LedgerRow]:
        """Every job (or those in ``state``), in the order they were first submitted."""
        query = "SELECT * FROM jobs" + (" WHERE state=?" if state else "") + " ORDER BY submitted_at, key"
        with self._lock:
            self._db.row_factory = sqlite3.Row
            try:
                raw = self._db.execute(query, (state,) if state else ()).fetchall()
            finally:
                self._db.row_factory = None
        return [self._row(r) for r in raw]

    def get(self, key: str) -> LedgerRow | None:
        """The job with ``key``, or ``None``."""
        with self._lock:
            self._db.row_factory = sqlite3.Row
            try:
                raw = self._db.execute("SELECT * FROM jobs WHERE key=?", (key,)).fetchone()
            finally:
                self._db.row_factory = None
        return None if raw is None else self._row(raw)

    def _row(self, r: sqlite3.Row) -> LedgerRow:
        report = None
        if r["report"]:
            try:
                # stored after validation; validated again, since the file may have been edited
                report = Report.from_json(r["report"])
            except (RawDataError, ValueError, TypeError) as exc:
                raise LedgerError(self.path, f"job {r['key']}: its stored report is damaged: {exc}") from exc
        return LedgerRow(
            key=r["key"],
            spec=r["spec"],
            environment=r["environment"],
            recipe=r["recipe"],
            state=r["state"],
            attempts=r["attempts"],
            worker=r["worker"],
            submitted_at=r["submitted_at"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            reason=r["reason"],
            distribution=r["distribution"],
            ok=None if r["ok"] is None else bool(r["ok"]),
            report=report,
            phases=json.loads(r["phases"]) if r["phases"] else {},
            timed_out=bool(r["timed_out"]),
            serial_tail=r["serial_tail"] or "",
            job=json.loads(r["job"]),
        )
