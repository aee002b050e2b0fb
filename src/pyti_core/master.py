"""The master: a queue of jobs and a store of raw-data records, served as JSON-RPC 2.0 over HTTP.

As in the original PyTI, slaves (machines that can run VMs) take jobs from a master and post the raw-data
records of each run back to it. The master keeps both in SQLite and speaks JSON-RPC 2.0
(https://www.jsonrpc.org/specification) on ``POST /``; batches (section 6) are accepted. Methods:

``jobs.take``    ``{"slave": "name"}`` -> a job ``{"job_id", "distribution", "recipe", "options"}`` or
                 ``null``. A job is handed out once; a taken job returns to the queue only when its
                 lease (``lease_s``) runs out without a submission.
``jobs.submit``  ``{"job_id": "...", "records": [<rawdata.report notification>, ...]}`` ->
                 ``{"accepted": n}``; the job is then done. Every record is validated with
                 :mod:`pyti_core.rawdata`.
``jobs.add``     ``{"distribution": "attrs==23.2.0", "recipe": "default", "options": {}}`` -> ``{"job_id"}``
``jobs.get``     ``{"job_id": "..."}`` -> the job, its state and its records.

Bad input gets a JSON-RPC error object with the standard codes (-32700 parse error, -32600 invalid
request, -32601 method not found, -32602 invalid params), or the master's own: -32001 unknown job,
-32002 job not taken (already done, or never handed out). Bodies larger than ``max_body`` are refused
with HTTP 413 before they are read. ``GET /jobs/<id>`` returns a job's records as a report.

Only the standard library is used: :mod:`http.server`, :mod:`sqlite3`, :mod:`json`.
"""

from __future__ import annotations

import http.server
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

import attrs

from pyti_core.errors import RawDataError, TaskError
from pyti_core.rawdata import MAX_RECORD_BYTES, RawDataRecord, Report

__all__ = [
    "APP_JOB_NOT_TAKEN",
    "APP_UNKNOWN_JOB",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_BODY_BYTES",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "Job",
    "JobState",
    "Master",
]

log = logging.getLogger(__name__)

# JSON-RPC 2.0 specification, section 5.1
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# application errors (the spec leaves -32000..-32099 to the server)
APP_UNKNOWN_JOB: Final = -32001
APP_JOB_NOT_TAKEN: Final = -32002

MAX_BODY_BYTES: Final = 64 << 20
MAX_BATCH: Final = 1000
MAX_RECORDS_PER_JOB: Final = 1000
MAX_DISTRIBUTION_CHARS: Final = 4096
MAX_OPTIONS_BYTES: Final = 64 << 10
_RECIPE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_JOB_ID: Final = re.compile(r"^[0-9a-f]{32}$")

JobState = Literal["pending", "taken", "done"]


class _RpcFault(Exception):
    """Raised inside a method to answer with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@attrs.frozen
class Job:
    """A unit of work: test ``distribution`` with ``recipe``; ``options`` is free-form JSON for the runner."""

    job_id: str
    distribution: str
    recipe: str = "default"
    options: Mapping[str, Any] = attrs.field(factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "distribution": self.distribution,
            "recipe": self.recipe,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, obj: object) -> Job:
        """Validate a job object (as sent by ``jobs.take``); :class:`TaskError` says what is wrong."""
        if not isinstance(obj, Mapping):
            raise TaskError(f"a job must be an object, got {type(obj).__name__}")
        job_id = obj.get("job_id")
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise TaskError("job.job_id must be 32 lower-case hex digits")
        distribution, recipe, options = _check_job_fields(
            obj.get("distribution"), obj.get("recipe", "default"), obj.get("options", {})
        )
        return cls(job_id, distribution, recipe, options)


def _check_job_fields(
    distribution: object, recipe: object, options: object
) -> tuple[str, str, dict[str, Any]]:
    if not isinstance(distribution, str) or not distribution.strip():
        raise TaskError("distribution must be a non-empty string")
    if len(distribution) > MAX_DISTRIBUTION_CHARS:
        raise TaskError(f"distribution is longer than {MAX_DISTRIBUTION_CHARS} characters")
    if not isinstance(recipe, str) or not _RECIPE.match(recipe):
        raise TaskError("recipe must be a name of letters, digits, '-', '_' or '.' (at most 64)")
    if not isinstance(options, dict):
        raise TaskError("options must be an object")
    if len(json.dumps(options)) > MAX_OPTIONS_BYTES:
        raise TaskError(f"options are larger than {MAX_OPTIONS_BYTES} bytes of JSON")
    return distribution, recipe, options


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    distribution TEXT NOT NULL,
    recipe TEXT NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'taken', 'done')),
    slave TEXT,
    created_at REAL NOT NULL,
    taken_at REAL,
    done_at REAL
);
CREATE TABLE IF NOT EXISTS records (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    task_id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
"""


class Master:
    """Jobs and records in the SQLite database ``db_path`` (created if missing), served over HTTP.

    ``serve()`` starts the HTTP server in a background thread and returns its URL; ``close()`` (or
    leaving the ``with`` block) stops it and closes the database.
    """

    def __init__(
        self,
        db_path: str | Path,
        *,
        max_body: int = MAX_BODY_BYTES,
        lease_s: float = 6 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = Path(db_path)
        self.max_body = max_body
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "jobs.take": self._rpc_take,
            "jobs.submit": self._rpc_submit,
            "jobs.add": self._rpc_add,
            "jobs.get": self._rpc_get,
        }

    # -- the store ---------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_job(
        self, distribution: str, recipe: str = "default", options: Mapping[str, Any] | None = None
    ) -> str:
        """Queue a job; return its id. :class:`TaskError` for an empty distribution or a bad recipe name."""
        distribution, recipe, opts = _check_job_fields(distribution, recipe, dict(options or {}))
        job_id = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, distribution, recipe, options, state, created_at)"
                " VALUES (?, ?, ?, ?, 'pending', ?)",
                (job_id, distribution, recipe, json.dumps(opts), self._clock()),
            )
        return job_id

    def take_job(self, slave: str) -> Job | None:
        """Hand the oldest pending job (or one whose lease ran out) to ``slave``; ``None`` if none is left."""
        now = self._clock()
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, distribution, recipe, options FROM jobs"
                " WHERE state = 'pending' OR (state = 'taken' AND taken_at < ?)"
                " ORDER BY created_at, rowid LIMIT 1",
                (now - self.lease_s,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'taken', slave = ?, taken_at = ? WHERE id = ?", (slave, now, row[0])
            )
        return Job(row[0], row[1], row[2], json.loads(row[3]))

    def submit(self, job_id: str, records: list[RawDataRecord]) -> int:
        """Store a taken job's records and mark it done; the number of records stored."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise _RpcFault(APP_UNKNOWN_JOB, f"unknown job {job_id!r}")
            if row[0] != "taken":
                raise _RpcFault(APP_JOB_NOT_TAKEN, f"job {job_id} is {row[0]}, not taken: records refused")
            db.executemany(
                "INSERT INTO records (job_id, idx, task_id, status, body) VALUES (?, ?, ?, ?, ?)",
                [(job_id, i, r.task_id, r.status, json.dumps(r.to_jsonrpc())) for i, r in enumerate(records)],
            )
            db.execute("UPDATE jobs SET state = 'done', done_at = ? WHERE id = ?", (self._clock(), job_id))
        return len(records)

    def job(self, job_id: str) -> tuple[Job, JobState]:
        """A job and its state; :class:`KeyError` if unknown."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, distribution, recipe, options, state FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise KeyError(job_id)
        return Job(row[0], row[1], row[2], json.loads(row[3])), row[4]

    def records(self, job_id: str) -> tuple[RawDataRecord, ...]:
        """The records a slave submitted for ``job_id`` (empty until it is done), in task order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM records WHERE job_id = ? ORDER BY idx", (job_id,)
            ).fetchall()
        return tuple(RawDataRecord.from_jsonrpc(json.loads(body), record=i) for i, (body,) in enumerate(rows))

    def report(self, job_id: str) -> Report:
        job, _ = self.job(job_id)
        return Report(job.distribution, self.records(job_id))

    # -- JSON-RPC ------------------------------------------------------------------------------------

    def _rpc_take(self, params: dict[str, Any]) -> Any:
        slave = params.get("slave", "")
        if not isinstance(slave, str) or len(slave) > 256:
            raise _RpcFault(INVALID_PARAMS, "params.slave must be a string of at most 256 characters")
        job = self.take_job(slave)
        return None if job is None else job.to_dict()

    def _rpc_submit(self, params: dict[str, Any]) -> Any:
        job_id = params.get("job_id")
        records = params.get("records")
        if not isinstance(job_id, str):
            raise _RpcFault(INVALID_PARAMS, "params.job_id must be a string")
        if not isinstance(records, list) or len(records) > MAX_RECORDS_PER_JOB:
            raise _RpcFault(INVALID_PARAMS, f"params.records must be a list of at most {MAX_RECORDS_PER_JOB}")
        parsed = []
        for i, obj in enumerate(records):
            try:
                if len(json.dumps(obj)) > MAX_RECORD_BYTES:
                    raise RawDataError(f"larger than the {MAX_RECORD_BYTES}-byte limit", record=i)
                parsed.append(RawDataRecord.from_jsonrpc(obj, record=i))
            except RawDataError as exc:
                raise _RpcFault(INVALID_PARAMS, f"params.records: {exc}", {"record": i}) from exc
        return {"accepted": self.submit(job_id, parsed)}

    def _rpc_add(self, params: dict[str, Any]) -> Any:
        try:
            job_id = self.add_job(
                params.get("distribution"),  # type: ignore[arg-type]  # checked by add_job
                params.get("recipe", "default"),
                params.get("options", {}),
            )
        except TaskError as exc:
            raise _RpcFault(INVALID_PARAMS, f"params.{exc}") from exc
        return {"job_id": job_id}

    def _rpc_get(self, params: dict[str, Any]) -> Any:
        job_id = params.get("job_id")
        if not isinstance(job_id, str):
            raise _RpcFault(INVALID_PARAMS, "params.job_id must be a string")
        try:
            job, state = self.job(job_id)
        except KeyError:
            raise _RpcFault(APP_UNKNOWN_JOB, f"unknown job {job_id!r}") from None
        return {**job.to_dict(), "state": state, "records": [r.to_jsonrpc() for r in self.records(job_id)]}

    def handle(self, body: bytes) -> bytes | None:
        """Answer one HTTP body of JSON-RPC 2.0 (a request, a notification or a batch).

        Returns the response body, or ``None`` when nothing must be answered (only notifications).
        Never raises for bad input.
        """
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            return _dump(_error(None, PARSE_ERROR, f"parse error: {type(exc).__name__}: {exc}"[:300]))
        try:  # JSON may escape lone surrogates (\ud800), which are not Unicode and cannot be stored
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return _dump(_error(None, PARSE_ERROR, "parse error: a string holds a lone surrogate escape"))
        if isinstance(message, list):
            if not message:
                return _dump(_error(None, INVALID_REQUEST, "invalid request: empty batch"))
            if len(message) > MAX_BATCH:
                return _dump(
                    _error(None, INVALID_REQUEST, f"invalid request: batch of more than {MAX_BATCH}")
                )
            answers = [a for a in (self._one(m) for m in message) if a is not None]
            return _dump(answers) if answers else None
        answer = self._one(message)
        return None if answer is None else _dump(answer)

    def _one(self, request: object) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return _error(None, INVALID_REQUEST, "invalid request: not an object")
        rid = request.get("id")
        valid_id = rid is None or isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))
        if not valid_id:
            return _error(None, INVALID_REQUEST, "invalid request: id must be a string, a number or null")
        if request.get("jsonrpc") != "2.0":
            return _error(rid, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        method = request.get("method")
        if not isinstance(method, str):
            return _error(rid, INVALID_REQUEST, 'invalid request: "method" must be a string')
        params = request.get("params", {})
        notification = "id" not in request
        if not isinstance(params, dict):
            answer = _error(rid, INVALID_PARAMS, "invalid params: params must be an object (by name)")
            return None if notification else answer
        handler = self._methods.get(method)
        if handler is None:
            answer = _error(rid, METHOD_NOT_FOUND, f"method not found: {method[:100]!r}")
            return None if notification else answer
        try:
            result = handler(params)
        except _RpcFault as fault:
            answer = _error(rid, fault.code, fault.message, fault.data)
        except Exception:
            log.exception("JSON-RPC method %s failed", method)
            answer = _error(rid, INTERNAL_ERROR, "internal error")
        else:
            answer = {"jsonrpc": "2.0", "result": result, "id": rid}
        return None if notification else answer

    # -- HTTP ----------------------------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving in a background thread; return the URL (``http://127.0.0.1:PORT/``)."""
        if self._server is not None:
            raise RuntimeError("this master is already serving")  # a programming error
        server = _Server((host, port), _Handler)
        server.master = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="pyti-master", daemon=True
        )
        self._thread.start()
        bound_host, bound_port = server.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        return f"http://{shown}:{bound_port}/"

    def close(self) -> None:
        """Stop the server (waiting for its thread) and close the database. Safe to call twice."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._server = None
            self._thread = None
        with self._lock:
            self._db.close()

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(rid: object, code: int, message: str, data: object = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "error": err, "id": rid}


def _dump(obj: object) -> bytes:
    return json.dumps(obj).encode()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    master: Master


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending mid-request is dropped, not waited for forever
    server_version = "pyti-master"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes | None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        self._send(status, _dump(_error(None, INVALID_REQUEST, message)))

    def do_POST(self) -> None:
        master = self.server.master
        if self.path not in ("/", "/rpc"):
            self._refuse(404, f"invalid request: no JSON-RPC endpoint at {self.path[:100]!r}; POST to /")
            return
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length_header is None:
            self._refuse(411, "invalid request: a Content-Length header is required")
            return
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self._refuse(400, "invalid request: bad Content-Length")
            return
        if length > master.max_body:
            self._refuse(
                413, f"invalid request: body of {length} bytes, more than the {master.max_body} limit"
            )
            return
        try:
            body = self.rfile.read(length)
        except OSError:
            self.close_connection = True
            return
        if len(body) != length:
            self.close_connection = True
            return
        answer = master.handle(body)
        if answer is None:
            self._send(204, None)
        else:
            self._send(200, answer)

    def do_GET(self) -> None:
        master = self.server.master
        match = re.fullmatch(r"/jobs/([0-9a-f]{32})", self.path)
        if match is None:
            self._send(404, b'{"error": "not found: GET /jobs/<job id>"}')
            return
        try:
            report = master.report(match.group(1))
        except KeyError:
            self._send(404, b'{"error": "unknown job"}')
            return
        self._send(200, report.to_json().encode())
