"""Any bytes a guest writes as records end as a rejected record with its reason, never a host crash.

The cases are values at or past their limits — numbers no float holds, dates past year 9999 or before
year 1, integers of thousands of digits, nesting thousands deep, lone surrogates, NaN — each alone
and together in one ``records.jsonl`` beside valid records, which the collector must all keep.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyti_core import manager
from pyti_core.errors import RawDataError
from pyti_core.rawdata import MAX_RECORD_BYTES, Report, load_guest_json, parse_record

TASKS = [{"id": str(i), "name": f"task{i}", "stop_on_failure": False} for i in range(1, 4)]


def params(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task_id": "1",
        "task": "task1",
        "status": "passed",
        "exit_code": 0,
        "stdout": "out",
        "stderr": "",
        "started_at": "2026-11-27T07:00:00.5Z",
        "duration_s": 1.5,
        "max_rss_kb": 20000,
        "cpu_user_s": 1.0,
        "cpu_system_s": 0.1,
    }
    base.update(changes)
    return base


def line(p: dict[str, Any] | str) -> bytes:
    text = (
        p if isinstance(p, str) else json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "params": p})
    )
    return text.encode("utf-8", "surrogatepass")


def raw(params_text: str) -> bytes:
    """A record whose params object is given as JSON text (for what json.dumps will not write)."""
    return ('{"jsonrpc": "2.0", "method": "rawdata.report", "params": ' + params_text + "}").encode()


def with_field(name: str, json_value: str) -> bytes:
    text = json.dumps(params())
    return raw(text.replace(f'"{name}": {json.dumps(params()[name])}', f'"{name}": {json_value}'))


HOSTILE: dict[str, bytes] = {
    "duration 1e300": line(params(duration_s=1e300)),
    "duration 1e308 near float max": with_field("duration_s", "1.7e308"),
    "duration overflowing to inf": with_field("duration_s", "1e400"),
    "cpu time NaN": with_field("cpu_user_s", "NaN"),
    "cpu time Infinity": with_field("cpu_system_s", "Infinity"),
    "cpu time -Infinity": with_field("cpu_system_s", "-Infinity"),
    "duration an int of 400 digits": with_field("duration_s", "9" * 400),
    "exit code of 4000 digits": with_field("exit_code", "7" * 4000),
    "exit code of 5000 digits (past the str limit)": with_field("exit_code", "7" * 5000),
    "max rss of 30 digits": with_field("max_rss_kb", "9" * 30),
    "test count of 4299 digits": line(params()).replace(
        b'"cpu_system_s"', b'"tests": {"passed": ' + b"1" * 4299 + b'}, "cpu_system_s"'
    ),
    "year 9999 plus a duration": line(params(started_at="9999-12-31T23:59:59Z", duration_s=5.0)),
    "year 9999 at the end": line(params(started_at="9999-12-31T23:59:59.999999Z", duration_s=0.5)),
    "before year 1 after the UTC shift": line(params(started_at="0001-01-01T00:00:00+05:00")),
    "year 0": line(params(started_at="0000-01-01T00:00:00Z")),
    "negative year": line(params(started_at="-0001-01-01T00:00:00Z")),
    "nesting 100000 deep": raw(json.dumps(params())[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "nesting 5000 objects deep": raw(
        json.dumps(params())[:-1] + ', "x": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}"
    ),
    "lone surrogate in stdout": with_field("stdout", '"\\ud800 tail"'),
    "lone low surrogate in task": with_field("task", '"\\udc80"'),
    "lone surrogate in a key": raw(json.dumps(params())[:-1] + ', "\\udfff": 1}'),
    "invalid UTF-8": line(params()).replace(b'"out"', b'"\xff\xfe"'),
    "a NUL byte": line(params()).replace(b'"out"', b'"o\x00ut"'),
    "a huge task id": line(params(task_id="1" * 100_000)),
    "a float exit code": with_field("exit_code", "1.5"),
    "a bool exit code": with_field("exit_code", "true"),
    "params a list": raw("[1, 2, 3]"),
    "not JSON": b"\x00\x01\x02 not json at all",
    "a bare number of 5000 digits": b"9" * 5000,
    "a bare string": b'"just a string"',
    "a huge float string": with_field("duration_s", "0." + "0" * 100_000 + "1"),
    "an exponent of 10 digits": with_field("duration_s", "1e9999999999"),
}


@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_record_is_rejected_with_a_reason(data: bytes) -> None:
    with pytest.raises(RawDataError) as excinfo:
        parse_record(data, record=7)
    assert excinfo.value.record == 7
    assert len(str(excinfo.value)) < 1000  # the reason is short, whatever the guest wrote


def test_valid_record_at_the_limits_is_kept() -> None:
    rec = parse_record(line(params(exit_code=-(2**31), max_rss_kb=2**62, started_at="0001-01-02T00:00:00Z")))
    assert rec.exit_code == -(2**31)
    rec = parse_record(line(params(started_at="9999-12-31T23:59:58Z", duration_s=1.0)))
    assert rec.duration_s == 1.0
    rec = parse_record(line(params(stdout="é ✓ \U0001f600 \x1b[31m")))
    assert rec.stdout.startswith("é")


def test_load_guest_json_is_the_one_edge() -> None:
    assert load_guest_json(b'{"a": [1, 2.5, "x", null, true]}', what="frame") == {
        "a": [1, 2.5, "x", None, True]
    }
    with pytest.raises(RawDataError, match="frame is 12 bytes, more than the 10-byte limit"):
        load_guest_json(b'{"a": 12345}', max_bytes=10, what="frame")
    with pytest.raises(RawDataError, match="nested deeper than"):
        load_guest_json(b"[" * 40 + b"]" * 40, what="frame")
    with pytest.raises(RawDataError, match="NaN"):
        load_guest_json(b"[NaN]", what="frame")
    with pytest.raises(RawDataError, match="digits"):
        load_guest_json(b"[" + b"1" * 30 + b"]", what="frame")
    with pytest.raises(RawDataError, match="surrogate"):
        load_guest_json(b'["\\udc00"]', what="frame")


def test_report_from_json_rejects_hostile_reports() -> None:
    for data in (b"[" * 100_000, b'{"distribution": "x", "records": [' + b"1" * 5000 + b"]}"):
        with pytest.raises(RawDataError):
            Report.from_json(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_are_a_record_or_a_raw_data_error(data: bytes) -> None:
    with contextlib.suppress(RawDataError):
        parse_record(data)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(list(params())),
        st.one_of(
            st.integers(min_value=-(10**30), max_value=10**30),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=30),
            st.none(),
            st.booleans(),
            st.sampled_from(["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "2026-01-01T00:00:00"]),
        ),
        max_size=6,
    )
)
def test_mutated_records_are_kept_or_rejected_never_crash(changes: dict[str, Any]) -> None:
    data = json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "params": params(**changes)})
    try:
        rec = parse_record(data)
    except RawDataError:
        return
    rec.to_jsonrpc()  # a kept record can be written back
    json.dumps(Report("x", (rec,)).to_json())


def test_collector_keeps_every_valid_record_of_a_hostile_file(tmp_path: Path) -> None:
    good = [line(params(task_id=t["id"], task=t["name"])) for t in TASKS]
    hostile = list(HOSTILE.values())
    # a line longer than one record may be, a flood of tiny junk lines
    hostile.append(b"x" * (MAX_RECORD_BYTES + 10))
    hostile.append(b"{}\n" * 20_000)
    body = b"\n".join([hostile[0], good[0], *hostile[1:15], good[1], *hostile[15:], good[2]]) + b"\n"
    path = tmp_path / "records.jsonl"
    path.write_bytes(body)
    records = manager._collect_records(path, TASKS, timed_out=False, exited=True, job_timeout=60.0, serial="")
    assert [(r.task_id, r.status) for r in records] == [("1", "passed"), ("2", "passed"), ("3", "passed")]


def test_collector_reports_a_hostile_record_of_a_task_as_its_error(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(
        line(params(task_id="1", task="task1", duration_s=1e300))
        + b"\n"
        + line(params(task_id="2", task="task2", started_at="9999-12-31T23:59:59Z", duration_s=9.0))
        + b"\n"
        + line(params(task_id="3", task="task3"))
        + b"\n"
    )
    records = manager._collect_records(path, TASKS, timed_out=False, exited=True, job_timeout=60.0, serial="")
    assert [(r.task_id, r.status) for r in records] == [("1", "error"), ("2", "error"), ("3", "passed")]
    assert "duration_s" in records[0].stderr
    assert "started_at" in records[1].stderr


def test_guest_text_reaches_the_terminal_without_its_control_characters() -> None:
    from pyti_core.tables import Table, failure_line, printable

    hostile = "FAILED \x1b]52;c;ZXZpbA==\x07 \x1b[2J\x1b[1;1H \u202eexe.txt \x9b31m \x00 done"
    line = failure_line("out\n" + hostile)
    for bad in ("\x1b", "\x07", "\u202e", "\x9b", "\x00"):
        assert bad not in line
    assert line.startswith("FAILED \\x1b]52;c;ZXZpbA==\\x07")
    assert "\\u202eexe.txt" in line
    assert printable("é ✓ \U0001f600\tplain") == "é ✓ \U0001f600\\x09plain"
    text = Table("t\x1b[2J", ("task", "x"), (("a\x1bb", "1"),), notes=("n\x07",)).text()
    assert "\x1b" not in text
    assert "\x07" not in text


def test_live_test_reports_reach_the_terminal_without_escape_sequences() -> None:
    import io

    from pyti_core.channel import TestReport
    from pyti_core.cli import ProgressDisplay

    report = TestReport(
        0.0,
        0.0,
        task_id="3",
        nodeid="test_x.py::test_\x1b]0;owned\x07",
        outcome="failed",
        word="FAILED\x1b[8m",
        when="call",
        duration_s=0.1,
        message="boom \x1b]52;c;ZXZpbA==\x07",
    )
    for live in (True, False):
        out = io.StringIO()
        display = ProgressDisplay(out, live=live)
        display("tasks", "running \x1b[2J")
        display.event(report)
        written = out.getvalue().replace("\r\x1b[K", "")  # the display's own line clearing
        assert "\x1b" not in written
        assert "\x07" not in written
        assert "\\x1b]52" in written


def test_a_guest_console_tail_in_an_error_reaches_the_terminal_without_escapes() -> None:
    from pyti_core import cli
    from pyti_core.errors import GuestBootError

    exc = GuestBootError("the guest did not boot", serial_log="login: \x1b]52;c;ZXZpbA==\x07\nend")
    text = cli._message(exc)
    assert "\x1b" not in text
    assert text.splitlines()[-1] == "end"
