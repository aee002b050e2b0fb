"""The live channel's wire format, and the guest's end of it (standard library only).

The host learns what happens in the guest while it runs through a virtio-serial port named
``org.pyti.rpc.0`` (libvirt ``<channel type='unix'>``, ``<target type='virtio' name='org.pyti.rpc.0'/>``).
This module is copied next to the agent onto the IO disk and imported by it as ``livechannel``, so it
uses the standard library only and runs on the oldest Python a guest may have. The host imports the
same module for the format (:class:`FrameDecoder`, :func:`encode_frame`, the names below), so the two
ends cannot drift.

**Frames.** Every message is one JSON-RPC 2.0 object (https://www.jsonrpc.org/specification) in UTF-8,
sent as a *frame*: a 4-byte big-endian unsigned length, then that many bytes of JSON. A frame's body
is at most :data:`MAX_FRAME` bytes.

**Synchronisation** (after QEMU's guest agent ``guest-sync-delimited``). The host opens the channel by
sending a *marked* frame, the byte ``0xFF`` followed by a frame holding the request
``{"jsonrpc": "2.0", "method": "channel.sync", "id": N}`` with a random ``N``. The guest answers with a
marked frame ``{"jsonrpc": "2.0", "id": N, "result": {"sync": N, "time": <guest wall clock>}}``.
``0xFF`` never occurs in UTF-8 text and a frame's length never begins with it, so a reader that lost
its place (garbage, a partial frame left by an earlier connection) scans for ``0xFF``; the random id
tells the reply to *this* request from stale bytes. The host repeats the request, with a new id, after
any timeout and after any frame it cannot accept; until it has the reply it ignores everything else.

**Notifications** (guest to host, JSON-RPC notifications: no ``id``), each with ``params.time``, the
guest's wall clock when it was sent:

``agent.hello``       ``{"pid", "python", "heartbeat_s"}`` once the channel is open
``agent.heartbeat``   ``{"seq", "dropped"}`` every ``heartbeat_s`` seconds (``dropped``: events the guest
                      had to drop so far because the host did not read fast enough)
``task.started``      ``{"task_id", "task"}``
``task.output``       ``{"task_id", "stream": "stdout"|"stderr", "data"}`` chunks of a task's output
``test.report``       ``{"task_id", "nodeid", "outcome", "word", "when", "duration_s", "message"}``, one
                      per test outcome as pytest reports it (``outcome``: passed, failed, error, skipped,
                      xfailed, xpassed, or another category a pytest plugin reports)
``task.finished``     ``{"task_id", "task", "status", "exit_code", "duration_s"}``
``agent.exit``        ``{"status"}`` when the agent is done

The guest never blocks on the channel: events go through a bounded queue to a writer thread, and what
does not fit is dropped and counted. The IO disk stays the record of a run; the channel only tells.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "EVENT_METHODS",
    "HEADER",
    "MAX_FRAME",
    "PLUGIN_ENV",
    "PORT_NAME",
    "SYNC_BYTE",
    "SYNC_METHOD",
    "AgentLive",
    "FrameDecoder",
    "FrameError",
    "GuestChannel",
    "PluginRelay",
    "encode_frame",
    "find_port",
]

#: The virtio-serial port's name (``/dev/virtio-ports/<name>`` where udev runs).
PORT_NAME = "org.pyti.rpc.0"
#: Starts a marked frame: the sync request and its reply.
SYNC_BYTE = b"\xff"
#: A frame's length prefix.
HEADER = struct.Struct(">I")
#: The largest frame body either end accepts, in bytes.
MAX_FRAME = 64 * 1024
#: A marked frame longer than this is not a sync message: while scanning, it is skipped at once.
MAX_SYNC_FRAME = 1024
SYNC_METHOD = "channel.sync"
HELLO = "agent.hello"
HEARTBEAT = "agent.heartbeat"
EXIT = "agent.exit"
TASK_STARTED = "task.started"
TASK_OUTPUT = "task.output"
TASK_FINISHED = "task.finished"
TEST_REPORT = "test.report"
EVENT_METHODS = (HELLO, HEARTBEAT, EXIT, TASK_STARTED, TASK_OUTPUT, TASK_FINISHED, TEST_REPORT)
#: The environment variable that tells the pytest plugin where the agent listens for its reports.
PLUGIN_ENV = "PYTI_LIVE_SOCKET"
#: The pytest plugin's module name (``-p pyti_live``).
PLUGIN_MODULE = "pyti_live"
#: The most a datagram from the pytest plugin may hold.
MAX_PLUGIN_DATAGRAM = 16 * 1024


class FrameError(ValueError):
    """A frame that cannot be a frame: a length of zero or above the limit."""


def encode_frame(obj: object, *, marked: bool = False, max_frame: int = MAX_FRAME) -> bytes:
    """One frame holding ``obj`` as compact JSON; ``marked`` puts ``0xFF`` in front (sync messages)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if not body or len(body) > max_frame:
        raise FrameError(f"a frame body is 1..{max_frame} bytes, this one {len(body)}")
    return (SYNC_BYTE if marked else b"") + HEADER.pack(len(body)) + body


class FrameDecoder:
    """Splits a byte stream into frame bodies, never holding more than one frame's worth of bytes.

    :meth:`feed` takes bytes; :meth:`next_frame` gives ``(marked, body)`` pairs. While :attr:`syncing`
    (at the start, and after :meth:`resync`) only marked frames come out, and everything before them is
    skipped (counted in :attr:`skipped`). A ``0xFF`` whose length or body cannot start a sync message
    costs one byte, so a real message behind garbage is never skipped over. The caller ends the scan
    with :meth:`synced` once it accepts a marked frame. When synchronised, frames follow one another; a
    length of zero or above ``max_frame`` raises :class:`FrameError` (the caller resyncs); a marked
    frame may still come (the reply to a later request).
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.syncing = True
        self.skipped = 0
        self._buf = bytearray()
        self._candidate = 0  # while syncing: the length of the marked frame last given out

    def resync(self) -> None:
        """Scan for the next marked frame again (after an error, or a new sync request)."""
        self.syncing = True
        self._candidate = 0

    def synced(self) -> None:
        """The last marked frame was accepted: frames now follow one another."""
        self.syncing = False
        if self._candidate:
            del self._buf[: self._candidate]
            self._candidate = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        """Add received bytes; take the frames out with :meth:`next_frame`."""
        self._buf += data

    def next_frame(self) -> tuple[bool, bytes] | None:
        """The next ``(marked, body)``; None until more bytes arrive; :class:`FrameError` for a bad length."""
        if not self._buf:
            return None
        if self.syncing:
            if self._candidate:  # the last candidate was not accepted: it costs its 0xFF only
                self.skipped += 1
                del self._buf[:1]
                self._candidate = 0
            body = self._scan()
            return None if body is None else (True, body)
        return self._next()

    def _scan(self) -> bytes | None:
        buf = self._buf
        while True:
            start = buf.find(SYNC_BYTE)
            if start < 0:
                self.skipped += len(buf)
                del buf[:]
                return None
            if start:
                self.skipped += start
                del buf[:start]
            if len(buf) < 1 + HEADER.size:
                return None
            (length,) = HEADER.unpack_from(buf, 1)
            if not 0 < length <= MAX_SYNC_FRAME or (
                len(buf) > 1 + HEADER.size and buf[1 + HEADER.size] != 0x7B
            ):
                self.skipped += 1  # not a sync message: drop this 0xFF only, scan on
                del buf[:1]
                continue
            end = 1 + HEADER.size + length
            if len(buf) < end:
                return None
            self._candidate = end  # consumed by synced(); one byte of it by the next call otherwise
            return bytes(buf[1 + HEADER.size : end])

    def _next(self) -> tuple[bool, bytes] | None:
        buf = self._buf
        marked = buf[0] == SYNC_BYTE[0]
        offset = 1 if marked else 0
        if len(buf) < offset + HEADER.size:
            return None
        (length,) = HEADER.unpack_from(buf, offset)
        limit = MAX_SYNC_FRAME if marked else self.max_frame
        if not 0 < length <= limit:
            del buf[:]
            raise FrameError(f"frame length {length} is not within 1..{limit}")
        end = offset + HEADER.size + length
        if len(buf) < end:
            return None
        body = bytes(buf[offset + HEADER.size : end])
        del buf[:end]
        return marked, body


def find_port(name: str = PORT_NAME, dev: str = "/dev", sysfs: str = "/sys/class/virtio-ports") -> str | None:
    """The device of the virtio-serial port ``name``, or None when the guest has none.

    ``/dev/virtio-ports/<name>`` is a symlink made by udev; a guest without udev (pyti's tiny guest runs
    busybox) has only ``/dev/vportNpM``, whose name is in ``/sys/class/virtio-ports/vportNpM/name``.
    """
    link = os.path.join(dev, "virtio-ports", name)
    if os.path.exists(link):
        return link
    try:
        ports = sorted(os.listdir(sysfs))
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(sysfs, port, "name")) as f:
                if f.read().strip() == name:
                    path = os.path.join(dev, port)
                    return path if os.path.exists(path) else None
        except OSError:
            continue
    return None


# -- the guest's end --------------------------------------------------------------------------------------


class GuestChannel:
    """Writes notifications to the host through the port at ``path``; answers the host's sync requests.

    Nothing here blocks the caller: :meth:`notify` queues (at most ``queue_bytes`` of droppable events,
    output chunks and test reports; what does not fit is counted in :attr:`dropped`), a writer thread
    writes once the host has synchronised, a reader thread answers sync requests, and a heartbeat
    thread sends ``agent.heartbeat`` every ``heartbeat_s`` seconds (one waiting at a time). A port
    whose host end is not connected simply holds the events back. ``tick()`` is called from the
    heartbeat thread every ``tick_s`` seconds (the agent sends output chunks from it). Idle, the threads
    wake a few times a second at most: under emulation every wake-up costs.
    """

    def __init__(
        self,
        path: str,
        heartbeat_s: float = 2.0,
        queue_bytes: int = 1 << 20,
        tick: Callable[[], None] | None = None,
        tick_s: float = 1.0,
    ) -> None:
        self.path = path
        self.heartbeat_s = heartbeat_s
        self.queue_bytes = queue_bytes
        self.dropped = 0
        self._tick = tick
        self._tick_s = tick_s
        self._fd = -1
        self._cond = threading.Condition()
        self._urgent: collections.deque[bytes] = collections.deque()
        self._queue: collections.deque[tuple[bytes, str]] = collections.deque()
        self._queued_bytes = 0
        self._beat_waiting = False
        self._writing = False
        self._synced = False
        self._stop = threading.Event()
        self._seq = 0
        self._threads: list[threading.Thread] = []

    # -- public -------------------------------------------------------------------------------------------

    def open(self, fd: int | None = None) -> None:
        """Open the port (or take over ``fd``) and start the threads; ``OSError`` when it cannot be opened."""
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        else:
            os.set_blocking(fd, False)
        self._fd = fd
        self.notify(
            HELLO,
            {"pid": os.getpid(), "python": sys.version.split()[0], "heartbeat_s": self.heartbeat_s},
        )
        for target, name in ((self._reader, "reader"), (self._writer, "writer"), (self._beat, "heartbeat")):
            thread = threading.Thread(target=target, name="pyti-channel-" + name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self, method: str, params: dict[str, Any], droppable: bool = False) -> bool:
        """Queue one notification; False when it was dropped (not JSON, too large, or the queue is full)."""
        return self._put(method, params, "drop" if droppable else "keep")

    def close(self, flush_s: float = 2.0) -> None:
        """Send what is queued (for at most ``flush_s`` seconds), stop the threads, close the port."""
        deadline = time.monotonic() + flush_s
        with self._cond:
            while (
                self._synced
                and (self._queue or self._urgent or self._writing)
                and time.monotonic() < deadline
            ):
                self._cond.wait(0.05)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(1.0)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    # -- internals ----------------------------------------------------------------------------------------

    def _put(self, method: str, params: dict[str, Any], kind: str) -> bool:
        params = dict(params)
        params["time"] = time.time()
        try:
            frame = encode_frame({"jsonrpc": "2.0", "method": method, "params": params})
        except (FrameError, TypeError, ValueError):
            with self._cond:
                self.dropped += 1
            return False
        with self._cond:
            if kind == "drop" and self._queued_bytes + len(frame) > self.queue_bytes:
                self.dropped += 1
                return False
            if kind == "beat":
                if self._beat_waiting:
                    return False
                self._beat_waiting = True
            self._queue.append((frame, kind))
            self._queued_bytes += len(frame)
            self._cond.notify_all()
        return True

    def _reader(self) -> None:
        decoder = FrameDecoder(MAX_SYNC_FRAME)
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                events = poller.poll(1000)
                if not events:
                    continue
                if not any(ev & select.POLLIN for _, ev in events):
                    time.sleep(0.2)  # POLLHUP: the host end is not connected
                    continue
                data = os.read(self._fd, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                time.sleep(0.2)
                continue
            if not data:
                time.sleep(0.2)
                continue
            decoder.feed(data)
            while True:
                try:
                    frame = decoder.next_frame()
                except FrameError:
                    decoder.resync()
                    continue
                if frame is None:
                    break
                if self._answer(frame[1]):  # every host message is a marked sync request
                    decoder.synced()
                    decoder.resync()

    def _answer(self, body: bytes) -> bool:
        try:
            request = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
        if not isinstance(request, dict) or request.get("method") != SYNC_METHOD:
            return False
        sync_id = request.get("id")
        if isinstance(sync_id, bool) or not isinstance(sync_id, int):
            return False
        reply = {"jsonrpc": "2.0", "id": sync_id, "result": {"sync": sync_id, "time": time.time()}}
        with self._cond:
            self._urgent.append(encode_frame(reply, marked=True))
            self._cond.notify_all()
        return True

    def _take(self) -> bytes | None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()
            while not self._stop.is_set():
                if self._urgent:
                    self._synced = True
                    self._writing = True
                    return self._urgent.popleft()
                if self._synced and self._queue:
                    frame, kind = self._queue.popleft()
                    self._queued_bytes -= len(frame)
                    if kind == "beat":
                        self._beat_waiting = False
                    self._writing = True
                    return frame
                self._cond.wait(5.0)  # close() and notify() wake it: few idle wake-ups under emulation
        return None

    def _writer(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            frame = self._take()
            if frame is None:
                return
            view = memoryview(frame)
            while view and not self._stop.is_set():
                try:
                    events = poller.poll(500)
                    if not any(ev & select.POLLOUT for _, ev in events):
                        if events:
                            time.sleep(0.2)  # POLLHUP: nobody on the host end
                        continue
                    view = view[os.write(self._fd, view) :]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    time.sleep(0.2)

    def _beat(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._seq += 1
                self._put(HEARTBEAT, {"seq": self._seq, "dropped": self.dropped}, "beat")
                next_beat = now + self.heartbeat_s
            if self._tick is not None:
                with contextlib.suppress(Exception):
                    self._tick()
            self._stop.wait(min(self._tick_s, max(0.0, next_beat - time.monotonic())))


class PluginRelay:
    """Receives the pytest plugin's reports on a unix datagram socket and passes them to ``forward``.

    The plugin runs in the test process, which cannot open the port (a virtio-serial port has one
    opener: the agent). ``forward(report_dict)`` is called from the relay's thread.
    """

    def __init__(self, path: str, forward: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self._forward = forward
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # room for bursts of fast tests (capped by the kernel)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._sock.bind(path)
        self._sock.settimeout(5.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyti-plugin-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(MAX_PLUGIN_DATAGRAM + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) > MAX_PLUGIN_DATAGRAM:
                continue
            try:
                report = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(report, dict):
                with contextlib.suppress(Exception):
                    self._forward(report)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wake:
            wake.sendto(b"", self.path)  # wakes the thread's recv at once
        self._thread.join(1.0)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# -- what the agent uses ----------------------------------------------------------------------------------


class AgentLive:
    """The agent's side of the channel for one job: events for its tasks, the plugin relay, output.

    ``AgentLive(job.get("channel"))``: with ``None`` (the channel is off) every method does nothing and
    tasks run exactly as without it. Otherwise the port is looked up (``device``, a path, wins over
    ``port``, the name; a unix socket path is connected to, for running the agent on a host), the
    channel opened and the plugin relay started; a guest without the port runs without events.
    ``task_env(env)`` adds what the pytest plugin needs to a task's environment.
    """

    #: The most of one task's output sent as ``task.output`` chunks (its record has it all, capped).
    OUTPUT_BUDGET = 256 * 1024
    CHUNK = 8 * 1024

    def __init__(self, config: dict[str, Any] | None) -> None:
        self.config = config
        self.channel: GuestChannel | None = None
        self.relay: PluginRelay | None = None
        self.error: str | None = None
        self._lock = threading.Lock()
        self._task: tuple[str, str] | None = None
        self._outputs: list[tuple[str, str, int]] = []  # (stream, path, offset)
        self._sent = 0
        self._tmp: str | None = None
        if not config:
            return
        try:
            self._open(config)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.close(0, flush_s=0)

    def _open(self, config: dict[str, Any]) -> None:
        import stat  # noqa: PLC0415
        import tempfile  # noqa: PLC0415

        device = config.get("device") or find_port(str(config.get("port") or PORT_NAME))
        if not device:
            self.error = "no virtio-serial port named {}".format(config.get("port") or PORT_NAME)
            return
        heartbeat = float(config.get("heartbeat_s") or 2.0)
        channel = GuestChannel(str(device), heartbeat_s=heartbeat, tick=self._tick)
        if stat.S_ISSOCK(os.stat(device).st_mode):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(device))
            channel.open(fd=sock.detach())
        else:
            channel.open()
        self.channel = channel
        self._tmp = tempfile.mkdtemp(prefix="pyti-live-")
        self.relay = PluginRelay(os.path.join(self._tmp, "plugin.sock"), self._plugin_report)

    def task_env(self, env: dict[str, str], argv: list[str] | None = None) -> dict[str, str]:
        """``env`` plus, for a task that loads the plugin (``-p pyti_live`` in ``argv``), the plugin's
        folder on ``PYTHONPATH`` and, when the relay runs, its socket; other tasks' ``env`` as it is."""
        if not self.config or (argv is not None and PLUGIN_MODULE not in argv):
            return env
        env = dict(env)
        plugin_dir = self.config.get("plugin_dir")
        if plugin_dir:
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = str(plugin_dir) + (os.pathsep + old if old else "")
        if self.relay is not None:
            env[PLUGIN_ENV] = self.relay.path
        return env

    def task_started(self, task_id: str, name: str, output: str | None = None) -> None:
        """A task starts; ``output`` is the prefix of its ``.stdout``/``.stderr`` files, to be followed."""
        if self.channel is None:
            return
        with self._lock:
            self._task = (task_id, name)
            self._sent = 0
            self._outputs = [(s, output + "." + s, 0) for s in ("stdout", "stderr")] if output else []
        self.channel.notify(TASK_STARTED, {"task_id": task_id, "task": name})

    def task_finished(self, params: dict[str, Any]) -> None:
        """A task's record is written: the last of its output, then ``task.finished``."""
        if self.channel is None:
            return
        self._tick()
        with self._lock:
            self._task = None
            self._outputs = []
        self.channel.notify(
            TASK_FINISHED,
            {k: params.get(k) for k in ("task_id", "task", "status", "exit_code", "duration_s")},
        )

    def close(self, status: int, flush_s: float = 2.0) -> None:
        if self.channel is not None:
            self.channel.notify(EXIT, {"status": status})
            self.channel.close(flush_s)
            self.channel = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmp)
            self._tmp = None

    def _plugin_report(self, report: dict[str, Any]) -> None:
        channel, task = self.channel, self._task
        if channel is None or task is None:
            return
        params = {
            k: report[k]
            for k in ("nodeid", "outcome", "word", "when", "duration_s", "message")
            if isinstance(report.get(k), (str, int, float)) and not isinstance(report.get(k), bool)
        }
        if not isinstance(params.get("nodeid"), str) or not isinstance(params.get("outcome"), str):
            return
        params["task_id"] = task[0]
        channel.notify(TEST_REPORT, params, droppable=True)

    def _tick(self) -> None:
        channel = self.channel
        if channel is None:
            return
        with self._lock:
            if self._task is None:
                return
            task_id = self._task[0]
            for i, (stream, path, offset) in enumerate(self._outputs):
                if self._sent >= self.OUTPUT_BUDGET:
                    return
                try:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read(min(self.CHUNK, self.OUTPUT_BUDGET - self._sent))
                except OSError:
                    continue
                if not data:
                    continue
                # whole UTF-8 characters only: a cut one waits for the next tick
                text = data.decode("utf-8", "ignore") if len(data) < self.CHUNK else _whole_utf8(data)
                used = len(text.encode("utf-8")) if text else len(data)
                self._outputs[i] = (stream, path, offset + used)
                self._sent += used
                channel.notify(
                    TASK_OUTPUT, {"task_id": task_id, "stream": stream, "data": text}, droppable=True
                )


def _whole_utf8(data: bytes) -> str:
    for cut in range(4):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace")
