"""Raw-data records: what the guest reports about each task, as JSON-RPC 2.0 notifications.

The original PyTI chose JSON-RPC 2.0 for its "raw data API". A record is a notification (a request
object without an ``id``, JSON-RPC 2.0 specification section 4.1) whose method is ``rawdata.report``::

    {"jsonrpc": "2.0", "method": "rawdata.report", "params": {
        "task_id": "3f2c...", "task": "pytest", "status": "failed", "exit_code": 1,
        "stdout": "...", "stderr": "", "started_at": "2026-11-27T07:00:00.123456Z",
        "duration_s": 4.2, "max_rss_kb": 41234, "cpu_user_s": 3.1, "cpu_system_s": 0.4,
        "tests": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}}}

Records come from a guest that runs untrusted code, so the host validates every one at the edge
(:func:`parse_record`) and never trusts its size, types or encoding. Every JSON text from a guest —
a record, a line of the live channel — is decoded by :func:`load_guest_json`, the one edge: it caps
the size, the nesting depth and the digits of an integer, refuses ``NaN``/``Infinity`` and lone
surrogates, and turns every failure into a :class:`~pyti_core.errors.RawDataError` with its reason
(never a ``RecursionError``, an ``OverflowError`` or Python's own integer-digit ``ValueError``). The
schema is documented for users in ``docs/rawdata.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, Literal, cast, get_args

import attrs

from pyti_core.errors import RawDataError

__all__ = [
    "MAX_DURATION_S",
    "MAX_JSON_DEPTH",
    "MAX_RECORD_BYTES",
    "METHOD",
    "Environment",
    "RawDataRecord",
    "Report",
    "Status",
    "TestCounts",
    "load_guest_json",
    "parse_record",
    "parse_records",
]

METHOD: Final = "rawdata.report"
MAX_RECORD_BYTES: Final = 4 << 20  # stdout/stderr are capped in the guest well below this
MAX_JSON_DEPTH: Final = 32  # a record nests 3 deep; a channel frame a few more
MAX_DURATION_S: Final = 10 * 366 * 86400.0  # ten years: no task runs longer; 1e300 s is a lie
_MAX_INT_DIGITS: Final = 20  # 2**64 has 20 digits; no field needs more
_MAX_NAME_CHARS: Final = 1024  # task ids and names
_INT32: Final = 1 << 31
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


_ENV_TEXT: Final = (
    "implementation",
    "python_version",
    "os_name",
    "os_version",
    "os_pretty_name",
    "kernel",
    "init",
)
_ENV_NUMBERS: Final = ("cpus", "memory_mib")
_ENV_MAX_TEXT: Final = 256


@attrs.frozen
class Environment:
    """Where a run's tasks ran, measured inside the guest (``accelerator`` comes from the host).

    ``implementation`` is ``sys.implementation.name`` (``"cpython"``, ``"pypy"``), ``python_version``
    the full version (``"3.11.2"``), ``os_name``/``os_version``/``os_pretty_name`` come from os-release
    (NAME, VERSION_ID or VERSION_CODENAME, PRETTY_NAME), ``kernel`` is the kernel release, ``init`` the
    name of PID 1, ``cpus`` and ``memory_mib`` what the guest sees, ``accelerator`` ``"kvm"`` or
    ``"tcg"`` (empty when unknown). Unknown strings are empty, unknown numbers 0.
    """

    implementation: str = ""
    python_version: str = ""
    os_name: str = ""
    os_version: str = ""
    os_pretty_name: str = ""
    kernel: str = ""
    init: str = ""
    cpus: int = 0
    memory_mib: int = 0
    accelerator: str = ""

    @property
    def label(self) -> str:
        """A short name for tables and file names: ``py3.11.2``, ``pypy3.9.16``."""
        prefix = "pypy" if self.implementation == "pypy" else "py"
        return f"{prefix}{self.python_version}" if self.python_version else "unknown"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, obj: object, *, record: int | None = None, where: str = "environment") -> Environment:
        """Validate a decoded ``environment`` object; unknown keys are ignored."""
        if not isinstance(obj, Mapping):
            raise RawDataError(f"{where} must be an object", record=record)
        values: dict[str, Any] = {}
        for key in (*_ENV_TEXT, "accelerator"):
            value = obj.get(key, "")
            if not isinstance(value, str) or len(value) > _ENV_MAX_TEXT:
                raise RawDataError(
                    f"{where}.{key} must be a string of at most {_ENV_MAX_TEXT} characters", record=record
                )
            values[key] = value
        for key in _ENV_NUMBERS:
            value = obj.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 40:
                raise RawDataError(f"{where}.{key} must be an integer >= 0", record=record)
            values[key] = value
        return cls(**values)


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
    environment: Environment | None = None

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
        if self.environment is not None:
            out["environment"] = self.environment.to_dict()
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
            value = float(get(name, (int, float)))  # load_guest_json keeps ints within 20 digits
            if not math.isfinite(value) or not 0 <= value <= MAX_DURATION_S:
                raise RawDataError(
                    f"params.{name} must be a finite number >= 0 and at most {MAX_DURATION_S:g} s,"
                    f" got {value:g}",
                    record=record,
                )
            return value

        def name(field: str) -> str:
            value: str = get(field, str)
            if not value or len(value) > _MAX_NAME_CHARS:
                raise RawDataError(
                    f"params.{field} must be 1 to {_MAX_NAME_CHARS} characters, got {len(value)}",
                    record=record,
                )
            return value

        status = get("status", str)
        if status not in _STATUSES:
            raise RawDataError(
                f"params.status must be one of {sorted(_STATUSES)}, got {_short(repr(status), 40)}",
                record=record,
            )
        started_raw = get("started_at", str)
        try:
            started = datetime.fromisoformat(started_raw)
        except ValueError as exc:
            raise RawDataError(
                f"params.started_at is not an ISO 8601 time: {_short(repr(started_raw), 60)}", record=record
            ) from exc
        if started.tzinfo is None:
            raise RawDataError("params.started_at must carry a time zone (UTC, 'Z')", record=record)
        duration = number("duration_s")
        try:
            started = started.astimezone(UTC)
            started + timedelta(seconds=duration)  # the end must be a time too
        except OverflowError:
            raise RawDataError(
                f"params.started_at {started_raw!r} plus params.duration_s {duration:g} is not a time"
                " between the years 1 and 9999",
                record=record,
            ) from None
        max_rss = get("max_rss_kb", int)
        if not 0 <= max_rss < 1 << 63:
            raise RawDataError("params.max_rss_kb must be from 0 to 2**63 - 1", record=record)
        exit_code = get("exit_code", int, optional=True)
        if exit_code is not None and not -_INT32 <= exit_code < _INT32:
            raise RawDataError("params.exit_code must be a 32-bit integer", record=record)
        tests_raw = get("tests", dict, optional=True)
        tests = None
        if tests_raw is not None:
            counts: dict[str, int] = {}
            for key in ("passed", "failed", "errors", "skipped"):
                value = tests_raw.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _INT32:
                    raise RawDataError(
                        f"params.tests.{key} must be an integer from 0 to 2**31 - 1", record=record
                    )
                counts[key] = value
            tests = TestCounts(**counts)
        env_raw = p.get("environment")
        environment = (
            None
            if env_raw is None
            else Environment.from_dict(env_raw, record=record, where="params.environment")
        )
        return cls(
            task_id=name("task_id"),
            task=name("task"),
            status=cast(Status, status),
            exit_code=exit_code,
            stdout=get("stdout", str),
            stderr=get("stderr", str),
            started_at=started,
            duration_s=duration,
            max_rss_kb=max_rss,
            cpu_user_s=number("cpu_user_s"),
            cpu_system_s=number("cpu_system_s"),
            tests=tests,
            environment=environment,
        )


class _Refused(Exception):
    """Raised by the decoder's hooks; becomes a RawDataError."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise _Refused(f"a number written with {len(text)} characters (at most 64)")
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:30]} is beyond what a float holds")
    return value


def _parse_constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number (RFC 8259)")


_DECODER: Final = json.JSONDecoder(
    parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
)


def _check_tree(obj: object) -> None:
    """Depth and strings of a decoded value, without recursion."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _Refused(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("a string holds a lone surrogate (\\ud800-\\udfff), which is not text") from None


def load_guest_json(
    data: bytes | str,
    *,
    max_bytes: int = MAX_RECORD_BYTES,
    what: str = "record",
    record: int | None = None,
) -> Any:
    """Decode one JSON text a guest wrote, or raise :class:`RawDataError` saying why not.

    The one edge for everything a guest sends as JSON (records on the IO disk, frames on the live
    channel): at most ``max_bytes`` bytes, nested at most :data:`MAX_JSON_DEPTH` deep, integers of at
    most 20 digits, finite numbers only (no ``NaN``/``Infinity``), valid UTF-8 without lone
    surrogates. ``what`` names the thing in messages (``"record"``, ``"frame"``).
    """
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > max_bytes:
        raise RawDataError(f"{what} is {size} bytes, more than the {max_bytes}-byte limit", record=record)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = _DECODER.decode(text)
        _check_tree(obj)
    except _Refused as exc:
        raise RawDataError(f"{what} refused: {exc}", record=record) from None
    except UnicodeDecodeError as exc:
        raise RawDataError(
            f"{what} is not JSON: not UTF-8 text ({exc.reason} at byte {exc.start})", record=record
        ) from None
    except json.JSONDecodeError as exc:
        raise RawDataError(f"{what} is not JSON: {exc.msg} at character {exc.pos}", record=record) from None
    except RecursionError:
        raise RawDataError(
            f"{what} refused: nested deeper than {MAX_JSON_DEPTH} levels", record=record
        ) from None
    except (ValueError, OverflowError, MemoryError) as exc:  # defensive: nothing else may escape
        raise RawDataError(f"{what} refused: {_short(str(exc))}", record=record) from None
    return obj


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def parse_record(
    data: bytes | str, *, record: int | None = None, max_bytes: int = MAX_RECORD_BYTES
) -> RawDataRecord:
    """Parse and validate one record from its JSON text; :class:`RawDataError` says what is wrong."""
    obj = load_guest_json(data, max_bytes=max_bytes, what="record", record=record)
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
    """One run's records (one distribution in one environment): what ``pyti run --report`` writes.

    ``environment`` is where the run happened (measured in the guest, plus the host's accelerator);
    ``None`` when the guest never ran the agent. It is written first, before the records.
    """

    distribution: str
    records: tuple[RawDataRecord, ...]
    environment: Environment | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"distribution": self.distribution}
        out["environment"] = self.environment.to_dict() if self.environment is not None else None
        out["records"] = [r.to_jsonrpc() for r in self.records]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> Report:
        obj = load_guest_json(data, max_bytes=1 << 40, what="report")
        if not isinstance(obj, dict) or not isinstance(obj.get("distribution"), str):
            raise RawDataError('a report is an object with a "distribution" string and a "records" list')
        records = obj.get("records")
        if not isinstance(records, list):
            raise RawDataError('report "records" must be a list')
        env_raw = obj.get("environment")
        return cls(
            obj["distribution"],
            tuple(RawDataRecord.from_jsonrpc(r, record=i) for i, r in enumerate(records)),
            None if env_raw is None else Environment.from_dict(env_raw),
        )
