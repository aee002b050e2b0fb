"""Raw-data records: what the guest reports about each task, as JSON-RPC 2.0 notifications.

The original PyTI chose JSON-RPC 2.0 for its "raw data API". A record is a notification (a request
object without an ``id``, JSON-RPC 2.0 specification section 4.1) whose method is ``rawdata.report``::

    {"jsonrpc": "2.0", "method": "rawdata.report", "params": {
        "task_id": "3f2c...", "task": "pytest", "status": "failed", "exit_code": 1,
        "stdout": "...", "stderr": "", "started_at": "2026-11-27T07:00:00.123456Z",
        "duration_s": 4.2, "max_rss_kb": 41234, "cpu_user_s": 3.1, "cpu_system_s": 0.4,
        "tests": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}}}

Records come from a guest that runs untrusted code, so the host validates every one at the edge
(:func:`parse_record`) and never trusts its size, types or encoding. The schema is documented for
users in ``docs/rawdata.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, Literal, cast, get_args

import attrs

from pyti_core.errors import RawDataError

__all__ = [
    "MAX_RECORD_BYTES",
    "METHOD",
    "RawDataRecord",
    "Report",
    "Status",
    "TestCounts",
    "parse_record",
    "parse_records",
]

METHOD: Final = "rawdata.report"
MAX_RECORD_BYTES: Final = 4 << 20  # stdout/stderr are capped in the guest well below this
Status = Literal["passed", "failed", "error", "timeout"]
_STATUSES: Final = frozenset(get_args(Status))


@attrs.frozen
class TestCounts:
    """How many tests passed, failed, errored and were skipped (from JUnit XML or unittest)."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite its name

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped

    def to_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class RawDataRecord:
    """One task's result, as measured inside the guest."""

    task_id: str
    task: str
    status: Status
    exit_code: int | None
    stdout: str
    stderr: str
    started_at: datetime
    duration_s: float
    max_rss_kb: int
    cpu_user_s: float
    cpu_system_s: float
    tests: TestCounts | None = None

    @property
    def ok(self) -> bool:
        return self.status == "passed"

    def params(self) -> dict[str, Any]:
        """The record's ``params`` object."""
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "task": self.task,
            "status": self.status,
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "started_at": self.started_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "duration_s": self.duration_s,
            "max_rss_kb": self.max_rss_kb,
            "cpu_user_s": self.cpu_user_s,
            "cpu_system_s": self.cpu_system_s,
        }
        if self.tests is not None:
            out["tests"] = self.tests.to_dict()
        return out

    def to_jsonrpc(self) -> dict[str, Any]:
        """The record as a JSON-RPC 2.0 notification object."""
        return {"jsonrpc": "2.0", "method": METHOD, "params": self.params()}

    @classmethod
    def from_jsonrpc(cls, obj: object, *, record: int | None = None) -> RawDataRecord:
        """Validate a decoded JSON-RPC notification; :class:`RawDataError` says what is wrong."""
        if not isinstance(obj, Mapping):
            raise RawDataError(f"expected a JSON object, got {type(obj).__name__}", record=record)
        if obj.get("jsonrpc") != "2.0":
            raise RawDataError('"jsonrpc" must be "2.0" (JSON-RPC 2.0)', record=record)
        if obj.get("method") != METHOD:
            raise RawDataError(f'"method" must be "{METHOD}", got {obj.get("method")!r}', record=record)
        if "id" in obj:
            raise RawDataError("a raw-data record is a notification: it must not have an 'id'", record=record)
        params = obj.get("params")
        if not isinstance(params, Mapping):
            raise RawDataError('"params" must be an object', record=record)
        return cls._from_params(params, record)

    @classmethod
    def _from_params(cls, p: Mapping[str, Any], record: int | None) -> RawDataRecord:
        def get(name: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
            if name not in p:
                if optional:
                    return None
                raise RawDataError(f"params.{name} is missing", record=record)
            value = p[name]
            if value is None and optional:
                return None
            # bool is an int in Python but not in the schema
            if isinstance(value, bool) or not isinstance(value, types):
                want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
                raise RawDataError(f"params.{name} must be {want}, got {type(value).__name__}", record=record)
            return value

        def number(name: str) -> float:
            value = float(get(name, (int, float)))
            if not math.isfinite(value) or value < 0:
                raise RawDataError(f"params.{name} must be a finite number >= 0, got {value}", record=record)
            return value

        status = get("status", str)
        if status not in _STATUSES:
            raise RawDataError(
                f"params.status must be one of {sorted(_STATUSES)}, got {status!r}", record=record
            )
        started_raw = get("started_at", str)
        try:
            started = datetime.fromisoformat(started_raw)
        except ValueError as exc:
            raise RawDataError(
                f"params.started_at is not an ISO 8601 time: {started_raw!r}", record=record
            ) from exc
        if started.tzinfo is None:
            raise RawDataError("params.started_at must carry a time zone (UTC, 'Z')", record=record)
        max_rss = get("max_rss_kb", int)
        if max_rss < 0:
            raise RawDataError("params.max_rss_kb must be >= 0", record=record)
        tests_raw = get("tests", dict, optional=True)
        tests = None
        if tests_raw is not None:
            counts: dict[str, int] = {}
            for key in ("passed", "failed", "errors", "skipped"):
                value = tests_raw.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise RawDataError(f"params.tests.{key} must be an integer >= 0", record=record)
                counts[key] = value
            tests = TestCounts(**counts)
        return cls(
            task_id=get("task_id", str),
            task=get("task", str),
            status=cast(Status, status),
            exit_code=get("exit_code", int, optional=True),
            stdout=get("stdout", str),
            stderr=get("stderr", str),
            started_at=started.astimezone(UTC),
            duration_s=number("duration_s"),
            max_rss_kb=max_rss,
            cpu_user_s=number("cpu_user_s"),
            cpu_system_s=number("cpu_system_s"),
            tests=tests,
        )


def parse_record(
    data: bytes | str, *, record: int | None = None, max_bytes: int = MAX_RECORD_BYTES
) -> RawDataRecord:
    """Parse and validate one record from its JSON text."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > max_bytes:
        raise RawDataError(f"record is {size} bytes, more than the {max_bytes}-byte limit", record=record)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RawDataError(f"record is not JSON: {exc}", record=record) from exc
    return RawDataRecord.from_jsonrpc(obj, record=record)


def parse_records(lines: Iterable[bytes | str], *, max_bytes: int = MAX_RECORD_BYTES) -> list[RawDataRecord]:
    """Parse JSON lines (one record each; blank lines ignored)."""
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        out.append(parse_record(line, record=i, max_bytes=max_bytes))
    return out


@attrs.frozen
class Report:
    """A distribution's records: what ``pyti run --report`` writes."""

    distribution: str
    records: tuple[RawDataRecord, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.records)

    def to_json(self) -> str:
        return json.dumps(
            {"distribution": self.distribution, "records": [r.to_jsonrpc() for r in self.records]},
            indent=2,
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Report:
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RawDataError(f"report is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("distribution"), str):
            raise RawDataError('a report is an object with a "distribution" string and a "records" list')
        records = obj.get("records")
        if not isinstance(records, list):
            raise RawDataError('report "records" must be a list')
        return cls(
            obj["distribution"],
            tuple(RawDataRecord.from_jsonrpc(r, record=i) for i, r in enumerate(records)),
        )
