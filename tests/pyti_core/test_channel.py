"""The live channel over real unix sockets: the wire format, the sync handshake, events, stalls, abuse.

The guest's end (:class:`GuestChannel`, stdlib only) and the host's (:class:`LiveChannel`) talk through a
unix stream socket exactly as through QEMU's ``<channel type='unix'>``: the test listens where QEMU
would, the host connects, and the accepted socket is the guest's "port".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyti_core.channel import (
    AgentExit,
    AgentHello,
    ChannelConfig,
    ChannelEvent,
    Heartbeat,
    LiveChannel,
    TaskFinished,
    TaskOutput,
    TaskStarted,
    TestReport,
    parse_event,
)
from pyti_core.errors import ChannelFrameError, ConfigError
from pyti_core.guest import livechannel as wire
from pyti_core.guest.livechannel import FrameDecoder, FrameError, GuestChannel, encode_frame


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Port:
    """Where QEMU would listen: the host's LiveChannel connects here, :meth:`accept` is the guest's end."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "rpc.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(1)
        self.server.settimeout(10)
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        conn, _ = self.server.accept()
        conn.settimeout(10)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.server.close()


@pytest.fixture
def port(tmp_path: Path) -> Iterator[Port]:
    p = Port(tmp_path)
    yield p
    p.close()


class Recorder:
    def __init__(self) -> None:
        self.events: list[ChannelEvent] = []
        self.lock = threading.Lock()

    def __call__(self, event: ChannelEvent) -> None:
        with self.lock:
            self.events.append(event)

    def of(self, kind: type[ChannelEvent]) -> list[ChannelEvent]:
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]


def read_sync_request(conn: socket.socket) -> int:
    """Read one marked sync request from the host; its id."""
    decoder = FrameDecoder()
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            request = json.loads(frame[1])
            assert request["method"] == "channel.sync"
            assert request["jsonrpc"] == "2.0"
            return int(request["id"])
        decoder.feed(conn.recv(4096))


def sync_reply(sync_id: int) -> bytes:
    reply = {"jsonrpc": "2.0", "id": sync_id, "result": {"sync": sync_id, "time": time.time()}}
    return encode_frame(reply, marked=True)


def note(method: str, **params: object) -> bytes:
    params.setdefault("time", time.time())
    return encode_frame({"jsonrpc": "2.0", "method": method, "params": params})


# -- the wire format ----------------------------------------------------------------------------------------


def test_frames_round_trip_and_split_anywhere() -> None:
    frames = [note("agent.heartbeat", seq=i, dropped=0) for i in range(5)]
    stream = sync_reply(7) + b"".join(frames)
    decoder = FrameDecoder()
    got: list[tuple[bool, bytes]] = []
    for i in range(len(stream)):  # one byte at a time: every split point
        decoder.feed(stream[i : i + 1])
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
            if frame[0]:
                decoder.synced()
    assert got[0][0] is True
    assert json.loads(got[0][1])["id"] == 7
    assert [json.loads(b)["params"]["seq"] for _, b in got[1:]] == list(range(5))


def test_scanning_skips_garbage_and_decoy_markers_but_never_the_real_reply() -> None:
    # decoy 0xFF bytes whose "length" would swallow the real reply if trusted
    decoys = b"\xff\x00\x00\x00\x40{garbage" + b"\xff\x00\x00\x03\xe8" + b"\xff\xff\xff\xff\xff" + b"junk\n"
    decoder = FrameDecoder()
    decoder.feed(decoys + sync_reply(42) + note("agent.heartbeat", seq=1, dropped=0))
    frame = decoder.next_frame()
    assert frame is not None
    assert frame[0]

    # the first decoy parses as a marked frame of garbage (its length fits): the caller rejects it
    def is_reply(body: bytes) -> bool:
        try:
            return json.loads(body).get("id") == 42
        except ValueError:
            return False

    bodies = [frame[1]]
    while not is_reply(bodies[-1]):
        frame = decoder.next_frame()
        assert frame is not None
        assert frame[0]
        bodies.append(frame[1])
    assert json.loads(bodies[-1])["id"] == 42
    assert len(bodies) <= 2  # at most the one decoy whose length fits, then the real reply
    decoder.synced()
    after = decoder.next_frame()
    assert after is not None
    assert not after[0]
    assert decoder.skipped > 0


def test_a_bad_length_once_synced_is_a_frame_error_and_the_buffer_is_dropped() -> None:
    decoder = FrameDecoder(max_frame=1024)
    decoder.synced()
    decoder.feed(b"\x00\x10\x00\x00" + b"x" * 100)
    with pytest.raises(FrameError, match="not within"):
        decoder.next_frame()
    assert decoder.buffered == 0
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_the_decoder_holds_no_more_than_a_frame_of_garbage() -> None:
    decoder = FrameDecoder()
    chunk = os.urandom(64 * 1024)
    for _ in range(64):  # 4 MiB of random bytes, with 0xFF in it here and there
        decoder.feed(chunk)
        while decoder.next_frame() is not None:
            pass
        assert decoder.buffered <= 1 + 4 + wire.MAX_SYNC_FRAME
    assert decoder.skipped > 3 * (1 << 20)


def test_encode_refuses_an_oversized_frame() -> None:
    with pytest.raises(FrameError, match=r"1\.\.16"):
        encode_frame({"x": "y" * 100}, max_frame=16)


# -- events at the edge -------------------------------------------------------------------------------------


def test_every_event_kind_is_parsed_and_typed() -> None:
    t = 1700000000.5
    cases = [
        (note("agent.hello", pid=12, python="3.11.2", heartbeat_s=2.0, time=t), AgentHello),
        (note("agent.heartbeat", seq=3, dropped=1, time=t), Heartbeat),
        (note("task.started", task_id="1", task="install", time=t), TaskStarted),
        (note("task.output", task_id="1", stream="stdout", data="hi\n", time=t), TaskOutput),
        (
            note(
                "test.report",
                task_id="4",
                nodeid="t.py::test_a",
                outcome="failed",
                word="FAILED",
                when="call",
                duration_s=0.5,
                message="assert 1 == 2",
                time=t,
            ),
            TestReport,
        ),
        (
            note("task.finished", task_id="1", task="install", status="passed", exit_code=0, duration_s=3.2),
            TaskFinished,
        ),
        (note("agent.exit", status=1), AgentExit),
    ]
    for frame, kind in cases:
        event = parse_event(frame[4:], received=5.0)
        assert type(event) is kind
        assert event.received == 5.0
    report = parse_event(cases[4][0][4:])
    assert isinstance(report, TestReport)
    assert (report.nodeid, report.outcome, report.message, report.guest_time) == (
        "t.py::test_a", "failed", "assert 1 == 2", t,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\x80\x81not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100000 + b"]" * 100000, "more than the 65536-byte limit"),
        (b"[" * 1000 + b"]" * 1000, "refused"),
        (json.dumps({"method": "agent.exit", "params": {"status": 0, "time": 1}}).encode(), "jsonrpc"),
        (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "agent.exit"}).encode(), "notifications only"),
        (json.dumps({"jsonrpc": "2.0", "method": "rm -rf", "params": {}}).encode(), "unknown"),
        (json.dumps({"jsonrpc": "2.0", "method": "agent.exit", "params": [1]}).encode(), "must be an object"),
        (note("agent.exit", status="0")[4:], "params.status must be an integer"),
        (note("agent.exit", status=True)[4:], "params.status must be an integer"),
        (b'{"jsonrpc":"2.0","method":"agent.exit","params":{"status":0,"time":NaN}}', "NaN"),
        (note("agent.exit", status=0, time=-1)[4:], "finite number >= 0"),
        (note("task.started", task_id="1" * 65, task="x")[4:], "more than 64"),
        (note("task.output", task_id="1", stream="stdin", data="x")[4:], "'stdout' or 'stderr'"),
        (note("test.report", task_id="1", nodeid=None, outcome="passed")[4:], "nodeid must be a string"),
    ],
)
def test_invalid_frames_are_typed_errors_saying_what_is_wrong(body: bytes, why: str) -> None:
    with pytest.raises(ChannelFrameError, match=why):
        parse_event(body)


def test_a_frame_error_is_a_raw_data_error_and_a_value_error() -> None:
    from pyti_core.errors import RawDataError

    assert issubclass(ChannelFrameError, RawDataError)
    assert issubclass(ChannelFrameError, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stall_timeout": 0},
        {"stall_timeout": -1},
        {"heartbeat": 30, "stall_timeout": 30},
        {"max_frame": 1 << 20},
    ],
)
def test_a_channel_config_that_cannot_work_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ChannelConfig(**kwargs)  # type: ignore[arg-type]


# -- host and guest over a real socket ---------------------------------------------------------------------


def test_events_flow_from_the_guest_channel_to_the_host_in_order(port: Port) -> None:
    recorder = Recorder()
    host = LiveChannel(port.path, ChannelConfig(heartbeat=0.2, stall_timeout=5), on_event=recorder).start()
    guest = GuestChannel(str(port.path), heartbeat_s=0.2)
    try:
        conn = port.accept()
        time.sleep(2.5)  # the agent starts late: sync requests pile up meanwhile, as during a boot
        guest.open(fd=os.dup(conn.fileno()))
        for i in range(50):
            guest.notify("task.started", {"task_id": str(i), "task": f"t{i}"})
        assert wait_until(lambda: len(recorder.of(TaskStarted)) == 50)
        assert wait_until(lambda: len(recorder.of(Heartbeat)) >= 2)
        assert host.state == "live"
        assert isinstance(recorder.events[0], AgentHello)  # sent at open, delivered after the sync
        assert [e.task_id for e in recorder.of(TaskStarted)] == [str(i) for i in range(50)]  # type: ignore[attr-defined]
        assert host.stats.clock_offset is not None
        assert abs(host.stats.clock_offset) < 0.5  # from a fresh exchange, not a request queued since
        assert host.stats.sync_rtt is not None
        assert host.stats.sync_rtt < 1.0
        assert host.unfinished == {str(i): f"t{i}" for i in range(50)}
        assert not host.stalled
    finally:
        guest.close(flush_s=1)
        host.close()
    assert host.stats.invalid == 0
    assert host.stats.cut_off is None


def test_stale_bytes_before_the_handshake_are_never_taken_for_events(port: Port) -> None:
    recorder = Recorder()
    host = LiveChannel(port.path, ChannelConfig(sync_interval=0.3), on_event=recorder).start()
    try:
        conn = port.accept()
        first = read_sync_request(conn)
        # an earlier connection's leftovers: half a frame, a reply to a request never sent, an event
        conn.sendall(note("task.started", task_id="stale", task="x")[:9] + sync_reply(first ^ 1))
        conn.sendall(note("task.started", task_id="stale", task="x"))
        time.sleep(0.5)
        assert host.state == "syncing"
        assert recorder.events == []
        # no reply in time: a new request with a new id
        second = read_sync_request(conn)
        assert second != first
        conn.sendall(sync_reply(second) + note("task.started", task_id="fresh", task="x"))
        assert wait_until(lambda: bool(recorder.events))
        assert [e.task_id for e in recorder.of(TaskStarted)] == ["fresh"]  # type: ignore[attr-defined]
        assert host.state == "live"
        assert host.stats.syncs_sent >= 2
    finally:
        host.close()


def test_a_garbled_frame_makes_the_host_resync_and_carry_on(port: Port) -> None:
    recorder = Recorder()
    host = LiveChannel(port.path, ChannelConfig(sync_interval=0.2), on_event=recorder).start()
    guest = GuestChannel(str(port.path), heartbeat_s=0.1)
    try:
        conn = port.accept()
        guest.open(fd=os.dup(conn.fileno()))
        assert wait_until(lambda: host.state == "live")
        conn.sendall(b"\x7f\xff\xff\xffnonsense")  # a length above the limit: the stream is lost
        assert wait_until(lambda: host.stats.invalid == 1)
        assert wait_until(lambda: host.state == "live")  # a new sync request, answered
        guest.notify("task.started", {"task_id": "after", "task": "x"})
        assert wait_until(lambda: any(e.task_id == "after" for e in recorder.of(TaskStarted)), 10)  # type: ignore[attr-defined]
        assert host.stats.invalid >= 1
        assert host.state == "live"
    finally:
        guest.close(flush_s=0)
        host.close()


def test_a_silent_agent_is_a_stall_and_a_finished_one_is_not(port: Port) -> None:
    cfg = ChannelConfig(heartbeat=0.1, stall_timeout=0.8)
    host = LiveChannel(port.path, cfg).start()
    try:
        conn = port.accept()
        conn.sendall(sync_reply(read_sync_request(conn)) + note("agent.heartbeat", seq=1, dropped=0))
        assert wait_until(lambda: host.state == "live")
        t0 = time.monotonic()
        assert not host.stalled
        assert wait_until(lambda: host.stalled, 5)
        assert 0.7 < time.monotonic() - t0 < 3
        conn.sendall(note("agent.exit", status=0))  # the agent said goodbye: silence is expected now
        assert wait_until(lambda: not host.stalled, 5)
        time.sleep(1.0)
        assert not host.stalled
    finally:
        host.close()


def test_a_channel_nobody_speaks_on_never_stalls(port: Port) -> None:
    host = LiveChannel(port.path, ChannelConfig(heartbeat=0.1, stall_timeout=0.3)).start()
    try:
        conn = port.accept()
        read_sync_request(conn)
        time.sleep(1.0)
        assert host.state == "syncing"
        assert not host.stalled  # a guest whose agent never opened the port: the job timeout applies
    finally:
        host.close()


def test_100_mb_of_garbage_cuts_the_channel_off_without_reading_it_all(port: Port) -> None:
    host = LiveChannel(port.path).start()
    try:
        conn = port.accept()
        read_sync_request(conn)
        junk = os.urandom(1 << 20)
        sent = 0
        conn.settimeout(2)
        refused: OSError | None = None
        try:
            while sent < 100 << 20:
                conn.sendall(junk)
                sent += len(junk)
        except OSError as exc:  # the host hung up (broken pipe), or stopped reading (timeout)
            refused = exc
        assert refused is not None
        assert sent < 100 << 20
        assert wait_until(lambda: host.state == "cut-off")
        assert "no frame" in (host.stats.cut_off or "") or "bytes/s" in (host.stats.cut_off or "")
        assert host.stats.bytes < 20 << 20
    finally:
        host.close()


def test_a_flood_of_valid_frames_hits_the_rate_limit(port: Port) -> None:
    cfg = ChannelConfig(rate_frames=100, burst_frames=500)
    recorder = Recorder()
    host = LiveChannel(port.path, cfg, on_event=recorder).start()
    try:
        conn = port.accept()
        beats = b"".join(note("agent.heartbeat", seq=i, dropped=0) for i in range(5000))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the host hangs up
            conn.sendall(sync_reply(read_sync_request(conn)) + beats)
        assert wait_until(lambda: host.state == "cut-off")
        assert "frames/s" in (host.stats.cut_off or "")
        assert len(recorder.events) <= 501
    finally:
        host.close()


def test_too_many_invalid_frames_cut_the_channel_off(port: Port) -> None:
    host = LiveChannel(port.path, ChannelConfig(max_invalid=3)).start()
    try:
        conn = port.accept()
        bad = encode_frame({"jsonrpc": "2.0", "method": "nope", "params": {}})
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(sync_reply(read_sync_request(conn)) + bad * 10)
        assert wait_until(lambda: host.state == "cut-off")
        assert "invalid frames" in (host.stats.cut_off or "")
        assert "unknown" in (host.stats.last_invalid or "")
    finally:
        host.close()


def test_a_failing_callback_does_not_stop_the_reader(port: Port) -> None:
    seen: list[ChannelEvent] = []

    def callback(event: ChannelEvent) -> None:
        seen.append(event)
        raise RuntimeError("user code")

    host = LiveChannel(port.path, on_event=callback).start()
    try:
        conn = port.accept()
        conn.sendall(sync_reply(read_sync_request(conn)) + note("agent.exit", status=0) * 3)
        assert wait_until(lambda: len(seen) == 3)
        assert host.state == "live"
    finally:
        host.close()


def test_nobody_listening_ends_the_channel_quietly(tmp_path: Path) -> None:
    host = LiveChannel(tmp_path / "absent.sock", connect_timeout=0.3).start()
    assert wait_until(lambda: host.state == "closed", 5)
    host.close()


def test_the_guest_drops_what_does_not_fit_and_never_blocks(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    guest = GuestChannel("socketpair", heartbeat_s=10, queue_bytes=4096)
    try:
        guest.open(fd=a.detach())  # nobody syncs: nothing is written, everything queues
        t0 = time.monotonic()
        results = [guest.notify("task.output", {"task_id": "1", "stream": "stdout", "data": "x" * 100}, True)
                   for _ in range(1000)]  # fmt: skip
        assert time.monotonic() - t0 < 2
        assert results.count(False) > 900
        assert guest.dropped == results.count(False)
        assert guest.notify("task.started", {"task_id": "1", "task": "x"})  # not droppable
        assert not guest.notify("task.output", {"data": object()}, True)  # not JSON: dropped, counted
    finally:
        guest.close(flush_s=0)
        b.close()


# -- what pyti run shows -------------------------------------------------------------------------------------


def _report(outcome: str, word: str, nodeid: str, message: str = "") -> TestReport:
    return TestReport(0.0, 0.0, "4", nodeid, outcome, word, "call", 0.1, message)


def test_the_plain_display_prints_each_test_and_a_failures_message() -> None:
    import io

    from pyti_core.cli import ProgressDisplay

    out = io.StringIO()
    display = ProgressDisplay(out, live=False)
    display("tasks", "pytest: PASSED t.py::test_a")
    display.event(_report("passed", "PASSED", "t.py::test_a"))
    display("tasks", "pytest: FAILED t.py::test_b")
    display.event(_report("failed", "FAILED", "t.py::test_b", "assert 1 == 2"))
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("tasks: pytest: PASSED t.py::test_a")
    assert lines[1].endswith("tasks: pytest: FAILED t.py::test_b")
    assert lines[2] == "    assert 1 == 2"
    assert len(lines) == 3


def test_the_live_display_keeps_failures_above_a_status_line_with_counts() -> None:
    import io

    from pyti_core.cli import ProgressDisplay

    out = io.StringIO()
    display = ProgressDisplay(out, live=True)
    display.event(_report("passed", "PASSED", "t.py::test_a"))
    display("tasks", "pytest: PASSED t.py::test_a")
    display.event(_report("failed", "FAILED", "t.py::test_b", "assert 1 == 2"))
    display("tasks", "pytest: FAILED t.py::test_b")
    display.close()
    text = out.getvalue()
    assert "\nFAILED t.py::test_b: assert 1 == 2\n" in text.replace("\r\x1b[K", "\n")
    assert "(1 passed, 1 failed)" in text
    assert text.endswith("\r\x1b[K")
