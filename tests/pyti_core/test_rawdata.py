"""Raw-data records: round trip, and rejection of everything a hostile guest could send."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyti_core.errors import RawDataError
from pyti_core.rawdata import Environment, RawDataRecord, Report, TestCounts, parse_record, parse_records


def _params(**over: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "task_id": "t-1",
        "task": "pytest",
        "status": "failed",
        "exit_code": 1,
        "stdout": "1 passed, 1 failed",
        "stderr": "",
        "started_at": "2026-11-27T07:00:00.5Z",
        "duration_s": 4.25,
        "max_rss_kb": 41234,
        "cpu_user_s": 3.5,
        "cpu_system_s": 0.25,
        "tests": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0},
    }
    p.update(over)
    return p


def _line(**over: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "params": _params(**over)})


def test_round_trip() -> None:
    record = parse_record(_line())
    assert record.status == "failed"
    assert not record.ok
    assert record.tests == TestCounts(passed=1, failed=1)
    assert record.tests.total == 2
    assert record.started_at == datetime(2026, 11, 27, 7, 0, 0, 500000, tzinfo=UTC)
    again = parse_record(json.dumps(record.to_jsonrpc()))
    assert again == record
    assert record.to_jsonrpc()["params"]["started_at"] == "2026-11-27T07:00:00.500000Z"


def test_tests_are_optional_and_exit_code_may_be_null() -> None:
    p = _params(exit_code=None)
    del p["tests"]
    record = RawDataRecord.from_jsonrpc({"jsonrpc": "2.0", "method": "rawdata.report", "params": p})
    assert record.tests is None
    assert record.exit_code is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json at all", "not JSON"),
        (b"\xff\xfe{", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"jsonrpc": "1.0", "method": "rawdata.report", "params": {}}), "2.0"),
        (json.dumps({"jsonrpc": "2.0", "method": "other", "params": {}}), "method"),
        (
            json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "id": 1, "params": _params()}),
            "notification",
        ),
        (json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "params": []}), "params"),
        (_line(status="exploded"), "params.status"),
        (_line(duration_s="4"), "params.duration_s must be int or float"),
        (_line(duration_s=-1), "finite number >= 0"),
        (_line(max_rss_kb=True), "params.max_rss_kb must be int"),
        (_line(started_at="yesterday"), "ISO 8601"),
        (_line(started_at="2026-11-27T07:00:00"), "time zone"),
        (_line(tests={"passed": -1}), "params.tests.passed"),
        (_line(stdout=None), "params.stdout"),
    ],
)
def test_malformed_records_are_rejected(line: str | bytes, message: str) -> None:
    with pytest.raises(RawDataError, match=message):
        parse_record(line)


def test_missing_field_is_named() -> None:
    p = _params()
    del p["cpu_user_s"]
    with pytest.raises(RawDataError, match=r"params.cpu_user_s is missing"):
        parse_record(json.dumps({"jsonrpc": "2.0", "method": "rawdata.report", "params": p}))


def test_oversized_record_is_rejected_before_parsing() -> None:
    with pytest.raises(RawDataError, match="more than the 1000-byte limit"):
        parse_record(_line(stdout="x" * 2000), max_bytes=1000)


def test_parse_records_names_the_bad_line() -> None:
    with pytest.raises(RawDataError, match=r"^record 2: "):
        parse_records([_line(), "", "{"])


def test_report_round_trip_and_validation() -> None:
    report = Report("attrs==23.2.0", (parse_record(_line()), parse_record(_line(status="passed"))))
    assert not report.ok
    assert Report.from_json(report.to_json()) == report
    with pytest.raises(RawDataError, match="records"):
        Report.from_json('{"distribution": "x", "records": 3}')
    with pytest.raises(RawDataError, match="record 0"):
        Report.from_json('{"distribution": "x", "records": [{}]}')


ENV: dict[str, Any] = {
    "implementation": "pypy",
    "python_version": "3.9.16",
    "os_name": "Debian GNU/Linux",
    "os_version": "12",
    "os_pretty_name": "Debian GNU/Linux 12 (bookworm)",
    "kernel": "6.1.0-57-cloud-amd64",
    "init": "init",
    "cpus": 1,
    "memory_mib": 479,
    "accelerator": "tcg",
}


def test_environment_round_trips_in_records_and_reports() -> None:
    record = parse_record(_line(environment=ENV))
    assert record.environment == Environment(**ENV)
    assert record.environment.label == "pypy3.9.16"
    assert parse_record(json.dumps(record.to_jsonrpc())) == record
    report = Report("x==1", (record,), record.environment)
    text = report.to_json()
    assert list(json.loads(text)) == ["distribution", "environment", "records"]  # environment at the top
    assert Report.from_json(text) == report
    bare = Report("x==1", ())
    assert json.loads(bare.to_json())["environment"] is None
    assert Report.from_json(bare.to_json()) == bare
    # a guest may add keys; they are ignored, never trusted
    assert parse_record(_line(environment={**ENV, "extra": [1]})).environment == Environment(**ENV)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ([], "params.environment must be an object"),
        ({**ENV, "cpus": "1"}, "params.environment.cpus must be an integer"),
        ({**ENV, "cpus": True}, "params.environment.cpus must be an integer"),
        ({**ENV, "memory_mib": -1}, "params.environment.memory_mib must be an integer"),
        ({**ENV, "kernel": "x" * 257}, "params.environment.kernel must be a string of at most 256"),
        ({**ENV, "init": None}, "params.environment.init must be a string"),
    ],
)
def test_a_bad_environment_is_rejected(env: object, message: str) -> None:
    with pytest.raises(RawDataError, match=message):
        parse_record(_line(environment=env))


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6)
            ),
            max_leaves=30,
        ).map(json.dumps),
    )
)
def test_arbitrary_input_never_crashes_the_host(data: bytes | str) -> None:
    with contextlib.suppress(RawDataError):
        parse_record(data)
