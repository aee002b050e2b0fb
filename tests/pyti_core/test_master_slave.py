"""master/slave: JSON-RPC 2.0 over HTTP on loopback, jobs handed out once, records stored in SQLite."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyti_core.errors import ConfigError, MasterUnreachableError, RpcError, TaskError
from pyti_core.master import (
    APP_JOB_NOT_TAKEN,
    APP_UNKNOWN_JOB,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Job,
    Master,
)
from pyti_core.rawdata import RawDataRecord, Report, TestCounts
from pyti_core.slave import Slave


def record(task: str = "pytest", status: str = "passed", **kw: Any) -> RawDataRecord:
    fields: dict[str, Any] = {
        "task_id": "1",
        "task": task,
        "status": status,
        "exit_code": 0 if status == "passed" else 1,
        "stdout": "out ✓",
        "stderr": "",
        "started_at": datetime(2026, 11, 27, 7, 0, tzinfo=UTC),
        "duration_s": 1.5,
        "max_rss_kb": 1234,
        "cpu_user_s": 0.5,
        "cpu_system_s": 0.25,
        "tests": TestCounts(passed=1, failed=1),
    }
    fields.update(kw)
    return RawDataRecord(**fields)


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[Master, str]]:
    with Master(tmp_path / "pyti.sqlite", max_body=1 << 20) as m:
        url = m.serve()
        yield m, url


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Raw HTTP POST (not through Slave), so malformed bodies can be sent."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers or {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, json.loads(data) if data else None


def test_a_job_goes_round_trip(master: tuple[Master, str]) -> None:
    m, url = master
    assert url.startswith("http://127.0.0.1:")
    job_id = m.add_job("attrs==23.2.0", "default", {"timeout": 60})
    slave = Slave(url, name="s1")
    job = slave.take_job()
    assert job == Job(job_id, "attrs==23.2.0", "default", {"timeout": 60})
    assert slave.take_job() is None
    assert m.job(job_id)[1] == "taken"
    sent = [record("install"), record("pytest", "failed", task_id="2", stdout="x" * 100_000)]
    assert slave.submit(job_id, sent) == 2
    assert m.records(job_id) == tuple(sent)
    assert m.job(job_id)[1] == "done"
    # the records live in SQLite: a new Master on the same file sees them
    with Master(m.db_path) as again:
        assert again.records(job_id) == tuple(sent)
        assert again.report(job_id) == Report("attrs==23.2.0", tuple(sent))
    # served back over JSON-RPC and as a report over GET
    got = slave.call("jobs.get", {"job_id": job_id})
    assert got["state"] == "done"
    assert [RawDataRecord.from_jsonrpc(r) for r in got["records"]] == sent
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(url).port, timeout=10)
    conn.request("GET", f"/jobs/{job_id}")
    assert Report.from_json(conn.getresponse().read()).records == tuple(sent)
    conn.close()


def test_two_slaves_race_one_gets_the_job(master: tuple[Master, str]) -> None:
    m, url = master
    job_ids = {m.add_job(f"pkg{i}==1.0") for i in range(20)}
    taken: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    barrier = threading.Barrier(len(taken))

    def work(name: str) -> None:
        slave = Slave(url, name=name)
        barrier.wait()
        while (job := slave.take_job()) is not None:
            taken[name].append(job.job_id)

    threads = [threading.Thread(target=work, args=(n,)) for n in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    every = [j for jobs in taken.values() for j in jobs]
    assert sorted(every) == sorted(job_ids)  # each job handed out exactly once
    with sqlite3.connect(m.db_path) as db:
        rows = dict(db.execute("SELECT id, slave FROM jobs").fetchall())
    assert all(rows[j] == name for name, jobs in taken.items() for j in jobs)


def test_a_lease_that_runs_out_gives_the_job_again(tmp_path: Path) -> None:
    now = [1000.0]
    with Master(tmp_path / "db", lease_s=60, clock=lambda: now[0]) as m:
        job_id = m.add_job("x==1")
        first = m.take_job("s1")
        assert first is not None
        assert m.take_job("s2") is None
        now[0] += 61
        second = m.take_job("s2")
        assert second is not None
        assert second.job_id == job_id
        m.submit(job_id, [record()])
        now[0] += 1000
        assert m.take_job("s3") is None  # done jobs never come back


def test_submit_errors(master: tuple[Master, str]) -> None:
    m, url = master
    slave = Slave(url)
    with pytest.raises(RpcError) as info:
        slave.submit("0" * 32, [record()])
    assert info.value.code == APP_UNKNOWN_JOB
    job_id = m.add_job("x==1")
    with pytest.raises(RpcError) as info:
        slave.submit(job_id, [record()])  # never taken
    assert info.value.code == APP_JOB_NOT_TAKEN
    assert slave.take_job() is not None
    bad = record().to_jsonrpc()
    bad["params"]["status"] = "great"
    with pytest.raises(RpcError, match=r"record 1: params.status must be one of") as info:
        slave.call("jobs.submit", {"job_id": job_id, "records": [record().to_jsonrpc(), bad]})
    assert (info.value.code, info.value.data) == (INVALID_PARAMS, {"record": 1})
    assert m.job(job_id)[1] == "taken"  # nothing stored, still open
    assert m.records(job_id) == ()
    assert slave.submit(job_id, [record()]) == 1
    with pytest.raises(RpcError) as info:
        slave.submit(job_id, [record()])  # twice
    assert info.value.code == APP_JOB_NOT_TAKEN
    assert len(m.records(job_id)) == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", PARSE_ERROR),
        (b"\xff\xfe", PARSE_ERROR),
        (b"[" * 100_000 + b"]" * 100_000, PARSE_ERROR),
        (
            b'{"jsonrpc": "2.0", "method": "jobs.add", "params": {"distribution": "\\ud800"}, "id": 1}',
            PARSE_ERROR,
        ),
        (b"[]", INVALID_REQUEST),
        (b"42", INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "method": "jobs.take", "id": 1}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "method": 5, "id": 1}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "method": "jobs.take", "id": {"x": 1}}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "method": "rm.rf", "id": 1}', METHOD_NOT_FOUND),
        (b'{"jsonrpc": "2.0", "method": "jobs.take", "params": [1], "id": 1}', INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "method": "jobs.take", "params": {"slave": 7}, "id": 1}', INVALID_PARAMS),
        (b'{"jsonrpc": "2.0", "method": "jobs.submit", "params": {"job_id": 1}, "id": 1}', INVALID_PARAMS),
        (
            b'{"jsonrpc": "2.0", "method": "jobs.add", "params": {"distribution": ""}, "id": 1}',
            INVALID_PARAMS,
        ),
        (b'{"jsonrpc": "2.0", "method": "jobs.get", "params": {"job_id": "nope"}, "id": 1}', APP_UNKNOWN_JOB),
    ],
)
def test_malformed_requests_get_jsonrpc_errors(master: tuple[Master, str], body: bytes, code: int) -> None:
    _, url = master
    status, answer = post(url, body)
    assert status == 200
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == code
    assert isinstance(answer["error"]["message"], str)
    # the server is still fine
    assert Slave(url).take_job() is None


def test_batches_and_notifications(master: tuple[Master, str]) -> None:
    m, url = master
    job_id = m.add_job("x==1")
    batch = [
        {"jsonrpc": "2.0", "method": "jobs.take", "params": {"slave": "b"}, "id": "a"},
        {"jsonrpc": "2.0", "method": "jobs.get", "params": {"job_id": job_id}},  # notification: no answer
        {"jsonrpc": "2.0", "method": "nope", "id": 2},
        7,
    ]
    status, answer = post(url, json.dumps(batch).encode())
    assert status == 200
    assert [a.get("id") for a in answer] == ["a", 2, None]
    assert answer[0]["result"]["job_id"] == job_id
    assert [a["error"]["code"] for a in answer[1:]] == [METHOD_NOT_FOUND, INVALID_REQUEST]
    status, answer = post(url, json.dumps(batch[1:2]).encode())
    assert (status, answer) == (204, None)


def test_oversized_and_lengthless_posts_are_refused(master: tuple[Master, str]) -> None:
    m, url = master
    status, answer = post(url, b"x" * ((1 << 20) + 1))
    assert status == 413
    assert answer["error"]["code"] == INVALID_REQUEST
    assert "limit" in answer["error"]["message"]
    # a huge Content-Length with no body behind it is refused without waiting for the body
    port = urllib.parse.urlsplit(url).port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 411")
    # a client that hangs up half-way does not hurt the server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"jsonrpc"')
    job_id = m.add_job("x==1")
    job = Slave(url).take_job()
    assert job is not None
    assert job.job_id == job_id


def test_run_forever_runs_jobs_and_reports_crashes(master: tuple[Master, str]) -> None:
    m, url = master
    ok = m.add_job("good==1")
    bad = m.add_job("bad==1")
    seen: list[Job] = []

    def run_job(job: Job) -> Sequence[RawDataRecord]:
        seen.append(job)
        if job.distribution == "bad==1":
            raise OSError("the VM would not boot")
        return [record("install"), record("import", task_id="2")]

    stop = threading.Event()
    done = Slave(url, name="loop").run_forever(run_job, poll_interval=0.05, stop_event=stop, max_jobs=2)
    assert done == 2
    assert [j.job_id for j in seen] == [ok, bad]
    assert [r.task for r in m.records(ok)] == ["install", "import"]
    (crash,) = m.records(bad)
    assert (crash.task, crash.status, crash.exit_code) == ("pyti", "error", None)
    assert "the VM would not boot" in crash.stderr


def test_run_forever_stops_on_the_event_even_without_a_master(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slave = Slave(f"http://127.0.0.1:{port}/", timeout=2)
    with pytest.raises(MasterUnreachableError, match="cannot reach the master"):
        slave.take_job()
    stop = threading.Event()
    thread = threading.Thread(
        target=slave.run_forever, args=(lambda job: [],), kwargs={"poll_interval": 0.05, "stop_event": stop}
    )
    thread.start()
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_slave_refuses_non_http_urls_and_bad_answers(master: tuple[Master, str]) -> None:
    with pytest.raises(ConfigError, match="master_url"):
        Slave("file:///etc/passwd")
    _, url = master
    with pytest.raises(RpcError, match="no JSON-RPC endpoint") as info:
        Slave(url + "nothing/here").call("jobs.take", {})
    assert info.value.code == INVALID_REQUEST

    answers = iter([(200, b"hello"), (500, b"<html>"), (200, b'{"jsonrpc": "2.0", "result": 1, "id": 99}')])

    class Wrong(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            status, body = next(answers)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Wrong)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        wrong = Slave(f"http://127.0.0.1:{server.server_address[1]}/")
        for message in ("not a JSON-RPC 2.0 answer", "HTTP 500", "not a JSON-RPC 2.0 answer to request 3"):
            with pytest.raises(MasterUnreachableError, match=message):
                wrong.take_job()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_job_validation(tmp_path: Path) -> None:
    with Master(tmp_path / "db") as m:
        with pytest.raises(TaskError, match="distribution must be a non-empty string"):
            m.add_job(" ")
        with pytest.raises(TaskError, match="recipe must be a name"):
            m.add_job("x", "../../etc")
        with pytest.raises(TaskError, match="options are larger"):
            m.add_job("x", options={"a": "x" * 70_000})
    with pytest.raises(TaskError, match="job_id"):
        Job.from_dict({"job_id": "x", "distribution": "a"})
    with pytest.raises(TaskError, match="must be an object"):
        Job.from_dict([])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_requests = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "1.0"]),
        "method": st.sampled_from(["jobs.take", "jobs.submit", "jobs.add", "jobs.get", "x"]),
    },
    optional={"params": _json, "id": _json},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=_json | _requests | st.lists(_requests, max_size=5) | st.binary(max_size=50))
def test_handle_never_raises(tmp_path: Path, message: object) -> None:
    with Master(tmp_path / "fuzz.sqlite") as m:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        answer = m.handle(body)
    if answer is None:
        return
    decoded = json.loads(answer)
    for item in decoded if isinstance(decoded, list) else [decoded]:
        assert item["jsonrpc"] == "2.0"
        assert ("result" in item) != ("error" in item)
        if "error" in item:
            assert isinstance(item["error"]["code"], int)
            assert item["error"]["code"] != -32603, item  # no internal errors from bad input
