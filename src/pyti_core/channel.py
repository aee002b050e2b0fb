"""The host's end of the live channel: frames from the guest's agent become events while the guest runs.

A run's VM has a virtio-serial port ``org.pyti.rpc.0`` whose host end is a unix socket in the run's
folder. :class:`LiveChannel` connects to it, synchronises (a random id, repeated after any timeout,
see :mod:`pyti_core.guest.livechannel` for the wire format), and turns every frame into a typed
:class:`ChannelEvent` handed to a callback, from its own thread::

    def on_event(event: ChannelEvent) -> None:
        if isinstance(event, TestReport):
            print(event.outcome, event.nodeid)

    channel = LiveChannel(socket_path, on_event=on_event)
    channel.start()
    ...
    channel.stalled        # no frame for ChannelConfig.stall_timeout seconds after the agent spoke
    channel.close()

**The guest is not trusted**, and the channel is only advisory (the IO disk holds a run's records).
Every frame is validated at the edge like a raw-data record, through the same
:func:`~pyti_core.rawdata.load_guest_json`: its size (``max_frame``), JSON (depth, number sizes, no
``NaN``, valid UTF-8), the JSON-RPC 2.0 shape and each method's schema
(:class:`~pyti_core.errors.ChannelFrameError` says what is
wrong). A bad frame is dropped and the channel resynchronised; after ``max_invalid`` of them, or when the
guest sends faster than the rate limit (bytes and frames per second, with a burst), or when it sends
more than ``max_skipped`` bytes that are no frame at all, the host *cuts the channel off*: it closes
the socket and reads nothing more. The reader never holds more than one frame plus one read, so a
guest that floods the channel cannot grow the host's memory, and the run goes on and ends from the
IO disk as if the channel did not exist.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import attrs

from pyti_core.errors import ChannelFrameError, ConfigError, RawDataError
from pyti_core.guest import livechannel as wire
from pyti_core.rawdata import load_guest_json

__all__ = [
    "PORT_NAME",
    "AgentExit",
    "AgentHello",
    "ChannelConfig",
    "ChannelEvent",
    "ChannelState",
    "ChannelStats",
    "EventCallback",
    "Heartbeat",
    "LiveChannel",
    "TaskFinished",
    "TaskOutput",
    "TaskStarted",
    "TestReport",
    "parse_event",
]

log = logging.getLogger(__name__)

PORT_NAME: Final = wire.PORT_NAME
ChannelState = Literal["connecting", "syncing", "live", "cut-off", "closed"]
#: ``on_event(event)``: called from the channel's reader thread; must not block for long.
EventCallback = Callable[["ChannelEvent"], None]
_READ: Final = 64 * 1024
#: Sync exchanges made once live, to measure the guest's clock offset (the first reply may be stale).
_CLOCK_ROUNDS: Final = 5
_MAX_TEXT: Final = 4096
_MAX_NODEID: Final = 4096
_MAX_OUTPUT: Final = 32 * 1024
#: Longest unix socket path (``sun_path`` is 108 bytes with its NUL).
MAX_SOCKET_PATH: Final = 107


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(None, f"channel.{attribute.name}", f"must be a number > 0, got {value!r}")


@attrs.frozen
class ChannelConfig:
    """How the live channel runs and what the host tolerates from the guest.

    * ``stall_timeout``: seconds without a frame (the agent sends a heartbeat every ``heartbeat``
      seconds) after which the guest counts as stopped: the run stops the VM and reports its unfinished
      tasks as errors. It starts counting when the agent first speaks; a guest whose agent never uses
      the channel runs until the job timeout, as without a channel.
    * ``heartbeat``: how often the agent sends a heartbeat, in seconds (must be below ``stall_timeout``).
    * ``sync_interval``: seconds to wait for the reply to a sync request before sending a new one.
    * ``max_frame``: the largest frame accepted, in bytes.
    * ``rate_bytes`` / ``burst_bytes``, ``rate_frames`` / ``burst_frames``: the token buckets that bound
      what the guest may send (per second, and at once).
    * ``max_invalid``: invalid frames tolerated before the channel is cut off.
    * ``max_skipped``: bytes that are no frame (garbage) tolerated before the channel is cut off.
    """

    stall_timeout: float = attrs.field(default=30.0, validator=_positive)
    heartbeat: float = attrs.field(default=2.0, validator=_positive)
    sync_interval: float = attrs.field(default=1.0, validator=_positive)
    max_frame: int = attrs.field(default=wire.MAX_FRAME, validator=_positive)
    rate_bytes: float = attrs.field(default=1 << 20, validator=_positive)
    burst_bytes: float = attrs.field(default=8 << 20, validator=_positive)
    rate_frames: float = attrs.field(default=2000.0, validator=_positive)
    burst_frames: float = attrs.field(default=20000.0, validator=_positive)
    max_invalid: int = attrs.field(default=16, validator=_positive)
    max_skipped: int = attrs.field(default=1 << 20, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.heartbeat >= self.stall_timeout:
            raise ConfigError(
                None,
                "channel.heartbeat",
                f"the heartbeat ({self.heartbeat:g} s) must be shorter than stall_timeout "
                f"({self.stall_timeout:g} s)",
            )
        if self.max_frame > wire.MAX_FRAME:
            raise ConfigError(
                None, "channel.max_frame", f"at most {wire.MAX_FRAME} bytes (the guest's limit)"
            )

    def to_job(self) -> dict[str, Any]:
        """What the agent needs to know (the ``channel`` object of ``job.json``)."""
        return {"port": PORT_NAME, "heartbeat_s": self.heartbeat}


# -- events -------------------------------------------------------------------------------------------------


class _Params:
    """Typed access to a frame's ``params``; every failure a :class:`ChannelFrameError`."""

    def __init__(self, method: str, params: Mapping[str, Any]) -> None:
        self.method = method
        self.p = params

    def _fail(self, name: str, what: str) -> ChannelFrameError:
        return ChannelFrameError(f"{self.method}: params.{name} {what}")

    def text(self, name: str, limit: int = _MAX_TEXT, *, optional: bool = False) -> str:
        value = self.p.get(name, "" if optional else None)
        if not isinstance(value, str):
            raise self._fail(name, f"must be a string, got {type(value).__name__}")
        if len(value) > limit:
            raise self._fail(name, f"is {len(value)} characters, more than {limit}")
        return value

    def integer(self, name: str, *, optional: bool = False) -> int | None:
        value = self.p.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1 << 53:
            raise self._fail(name, f"must be an integer, got {type(value).__name__}")
        return value

    def number(self, name: str, *, optional: bool = False) -> float:
        value = self.p.get(name)
        if value is None and optional:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, f"must be a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise self._fail(name, f"must be a finite number >= 0, got {value!r}")
        return number


@attrs.frozen
class ChannelEvent:
    """One notification from the guest's agent, validated.

    ``guest_time`` is the guest's wall clock when it was sent; ``received`` this host's
    ``time.monotonic()`` when it arrived.
    """

    method: ClassVar[str] = ""
    guest_time: float
    received: float

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> ChannelEvent:
        raise NotImplementedError


@attrs.frozen
class AgentHello(ChannelEvent):
    """The agent opened the channel: its process id, Python version and heartbeat interval."""

    method: ClassVar[str] = wire.HELLO
    pid: int
    python: str
    heartbeat_s: float

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> AgentHello:
        return cls(guest_time, received, p.integer("pid") or 0, p.text("python", 64), p.number("heartbeat_s"))


@attrs.frozen
class Heartbeat(ChannelEvent):
    """The agent is alive; ``dropped`` counts events it had to drop so far."""

    method: ClassVar[str] = wire.HEARTBEAT
    seq: int
    dropped: int

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> Heartbeat:
        return cls(guest_time, received, p.integer("seq") or 0, p.integer("dropped") or 0)


@attrs.frozen
class TaskStarted(ChannelEvent):
    method: ClassVar[str] = wire.TASK_STARTED
    task_id: str
    task: str

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> TaskStarted:
        return cls(guest_time, received, p.text("task_id", 64), p.text("task", 256))


@attrs.frozen
class TaskOutput(ChannelEvent):
    """A chunk of a task's output as it was written (the full, capped output is in its record)."""

    method: ClassVar[str] = wire.TASK_OUTPUT
    task_id: str
    stream: Literal["stdout", "stderr"]
    data: str

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> TaskOutput:
        stream = p.text("stream", 8)
        if stream not in ("stdout", "stderr"):
            raise ChannelFrameError(f"{p.method}: params.stream must be 'stdout' or 'stderr', got {stream!r}")
        return cls(guest_time, received, p.text("task_id", 64), stream, p.text("data", _MAX_OUTPUT))  # type: ignore[arg-type]


@attrs.frozen
class TestReport(ChannelEvent):
    """One test's outcome as pytest reported it: ``outcome`` is pytest's category (passed, failed,
    error, skipped, xfailed, xpassed, ...), ``word`` its verbose word (``PASSED``), ``when`` the phase
    (setup, call, teardown, collect); ``message`` is the failure's last line."""

    __test__: ClassVar[bool] = False  # not a pytest test class, despite its name
    method: ClassVar[str] = wire.TEST_REPORT
    task_id: str
    nodeid: str
    outcome: str
    word: str
    when: str
    duration_s: float
    message: str

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> TestReport:
        return cls(
            guest_time,
            received,
            task_id=p.text("task_id", 64),
            nodeid=p.text("nodeid", _MAX_NODEID),
            outcome=p.text("outcome", 32),
            word=p.text("word", 32, optional=True),
            when=p.text("when", 16, optional=True),
            duration_s=p.number("duration_s", optional=True),
            message=p.text("message", _MAX_TEXT, optional=True),
        )


@attrs.frozen
class TaskFinished(ChannelEvent):
    method: ClassVar[str] = wire.TASK_FINISHED
    task_id: str
    task: str
    status: str
    exit_code: int | None
    duration_s: float

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> TaskFinished:
        return cls(
            guest_time,
            received,
            p.text("task_id", 64),
            p.text("task", 256),
            p.text("status", 16),
            p.integer("exit_code", optional=True),
            p.number("duration_s"),
        )


@attrs.frozen
class AgentExit(ChannelEvent):
    """The agent is done (the guest powers off next)."""

    method: ClassVar[str] = wire.EXIT
    status: int

    @classmethod
    def _parse(cls, p: _Params, guest_time: float, received: float) -> AgentExit:
        return cls(guest_time, received, p.integer("status") or 0)


_EVENTS: Final[Mapping[str, type[ChannelEvent]]] = {
    c.method: c for c in (AgentHello, Heartbeat, TaskStarted, TaskOutput, TestReport, TaskFinished, AgentExit)
}


def parse_event(body: bytes, *, received: float | None = None) -> ChannelEvent:
    """Validate one frame body from the guest: JSON, a JSON-RPC 2.0 notification, its method's schema."""
    try:
        obj = load_guest_json(body, max_bytes=wire.MAX_FRAME, what="frame")
    except RawDataError as exc:  # the one edge for JSON from a guest, shared with the records
        raise ChannelFrameError(str(exc)) from None
    if not isinstance(obj, dict):
        raise ChannelFrameError(f"frame must be a JSON object, got {type(obj).__name__}")
    if obj.get("jsonrpc") != "2.0":
        raise ChannelFrameError('"jsonrpc" must be "2.0" (JSON-RPC 2.0)')
    if "id" in obj:
        raise ChannelFrameError("the guest sends notifications only: a frame must not have an 'id'")
    method = obj.get("method")
    kind = _EVENTS.get(method) if isinstance(method, str) else None
    if kind is None:
        raise ChannelFrameError(f'unknown "method" {str(method)[:64]!r}; known: {sorted(_EVENTS)}')
    params = obj.get("params")
    if not isinstance(params, dict):
        raise ChannelFrameError(f'{method}: "params" must be an object')
    p = _Params(str(method), params)
    return kind._parse(p, p.number("time"), time.monotonic() if received is None else received)


# -- the reader -------------------------------------------------------------------------------------------


@attrs.define
class ChannelStats:
    """What went over the channel: counts, and why it was cut off (``cut_off``, else ``None``).

    ``clock_offset`` is the guest's wall clock minus the host's, estimated from the sync round trip
    (``sync_rtt`` seconds); ``None`` until synchronised.
    """

    bytes: int = 0
    frames: int = 0
    events: int = 0
    invalid: int = 0
    skipped: int = 0
    syncs_sent: int = 0
    guest_dropped: int = 0
    cut_off: str | None = None
    last_invalid: str | None = None
    sync_rtt: float | None = None
    clock_offset: float | None = None


class _Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.level, self.at = rate, burst, burst, time.monotonic()

    def take(self, amount: float, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= amount
        return self.level >= 0


class LiveChannel:
    """Reads the guest's events from the unix socket ``path`` (the host end of the virtio-serial port).

    :meth:`start` starts the reader thread, which connects (retrying until the socket exists, for up to
    ``connect_timeout`` seconds), synchronises and calls ``on_event`` for every valid event. Nothing it
    does raises into the caller: an error ends or cuts off the channel (:attr:`state`, :attr:`stats`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: ChannelConfig | None = None,
        *,
        on_event: EventCallback | None = None,
        connect_timeout: float = 120.0,
    ) -> None:
        self.path = Path(path)
        self.config = config or ChannelConfig()
        self.stats = ChannelStats()
        self._on_event = on_event
        self._connect_timeout = connect_timeout
        self._state: ChannelState = "connecting"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._last_frame: float | None = None  # monotonic; None until the agent first spoke
        self._exited = False
        self._started: dict[str, str] = {}
        self._finished: set[str] = set()
        self._callback_failed = False

    # -- public -------------------------------------------------------------------------------------------

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def stalled(self) -> bool:
        """True when the agent spoke, has not said it is done, and has been silent ``stall_timeout`` s."""
        last = self._last_frame
        return (
            self._state in ("live", "syncing")
            and last is not None
            and not self._exited
            and time.monotonic() - last > self.config.stall_timeout
        )

    @property
    def silence(self) -> float | None:
        """Seconds since the last valid frame (None before the first)."""
        last = self._last_frame
        return None if last is None else time.monotonic() - last

    @property
    def unfinished(self) -> dict[str, str]:
        """``{task_id: task}`` of the tasks the agent said it started and did not say it finished."""
        with self._lock:
            return {k: v for k, v in self._started.items() if k not in self._finished}

    def start(self) -> LiveChannel:
        self._thread = threading.Thread(target=self._run, name=f"pyti-channel-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop reading and close the socket; waits for the reader thread (``timeout`` seconds)."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._state != "cut-off":
            self._state = "closed"

    def __enter__(self) -> LiveChannel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            sock = self._connect()
            if sock is None:
                return
            self._sock = sock
            try:
                self._read(sock)
            finally:
                sock.close()
        except Exception:  # the channel is advisory: never let its thread die with a traceback
            log.exception("live channel %s failed", self.path)
        finally:
            if self._state not in ("cut-off",):
                self._state = "closed"

    def _connect(self) -> socket.socket | None:
        deadline = time.monotonic() + self._connect_timeout
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    log.info("live channel %s: nobody listens after %.0f s", self.path, self._connect_timeout)
                    return None
                self._stop.wait(0.05)
                continue
            except OSError as exc:
                sock.close()
                log.warning("live channel %s: cannot connect: %s", self.path, exc)
                return None
            sock.setblocking(False)
            return sock
        return None

    def _read(self, sock: socket.socket) -> None:
        import selectors  # noqa: PLC0415 (only the reader thread needs it)

        cfg = self.config
        decoder = wire.FrameDecoder(cfg.max_frame)
        bytes_bucket = _Bucket(cfg.rate_bytes, cfg.burst_bytes)
        frames_bucket = _Bucket(cfg.rate_frames, cfg.burst_frames)
        outstanding: dict[int, float] = {}  # sync id -> monotonic time sent
        sync_sent = 0.0
        clock_rounds = 0
        self._state = "syncing"
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                now = time.monotonic()
                if decoder.syncing and now - sync_sent >= cfg.sync_interval:
                    sync_id = secrets.randbits(52) + 1
                    outstanding[sync_id] = now
                    sync_sent = now
                    request = {"jsonrpc": "2.0", "method": wire.SYNC_METHOD, "id": sync_id}
                    self.stats.syncs_sent += 1
                    try:
                        sock.sendall(wire.encode_frame(request, marked=True))
                    except BlockingIOError:
                        pass  # the guest is not reading yet: the next interval tries again
                    except OSError:
                        return
                elif not decoder.syncing and clock_rounds < _CLOCK_ROUNDS and now - sync_sent >= 1.0:
                    clock_rounds += 1  # a few more exchanges, one a second: the tightest sets the offset
                    sync_sent = now
                    if not self._clock_sync(sock, outstanding):
                        return
                if not selector.select(timeout=0.1):
                    continue
                try:
                    data = sock.recv(_READ)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                if not data:
                    return  # QEMU closed its end: the VM is gone
                now = time.monotonic()
                self.stats.bytes += len(data)
                if not bytes_bucket.take(len(data), now):
                    self._cut_off(
                        f"the guest sent more than {cfg.rate_bytes:g} bytes/s (burst {cfg.burst_bytes:g})"
                    )
                    return
                decoder.feed(data)
                while True:
                    skipped = decoder.skipped
                    try:
                        frame = decoder.next_frame()
                    except wire.FrameError as exc:
                        if not self._invalid(str(exc)):
                            return
                        decoder.resync()
                        self._state = "syncing"
                        sync_sent = 0.0  # a fresh sync request right away
                        outstanding.clear()
                        continue
                    finally:
                        self.stats.skipped += decoder.skipped - skipped
                        decoder.skipped = skipped = 0
                    if self.stats.skipped > cfg.max_skipped:
                        self._cut_off(f"the guest sent more than {cfg.max_skipped} bytes that are no frame")
                        return
                    if frame is None:
                        break
                    self.stats.frames += 1
                    if not frames_bucket.take(1, now):
                        self._cut_off(f"the guest sent more than {cfg.rate_frames:g} frames/s")
                        return
                    marked, body = frame
                    if marked:
                        if self._sync_reply(body, outstanding, now) and decoder.syncing:
                            decoder.synced()
                            outstanding.clear()
                            self._state = "live"
                            sync_sent = 0.0  # the first clock exchange right away
                        continue
                    try:
                        event = parse_event(body, received=now)
                    except ChannelFrameError as exc:
                        if not self._invalid(str(exc)):
                            return
                        continue  # the frame's boundaries held: no resync needed
                    self._event(event)

    def _sync_reply(self, body: bytes, outstanding: Mapping[int, float], now: float) -> bool:
        try:
            obj = load_guest_json(body, max_bytes=wire.MAX_SYNC_FRAME, what="sync reply")
        except RawDataError:
            return False
        if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
            return False
        sync_id, result = obj.get("id"), obj.get("result")
        if not isinstance(sync_id, int) or sync_id not in outstanding or not isinstance(result, dict):
            return False  # stale: an earlier connection's, or garbage
        if result.get("sync") != sync_id:
            return False
        sent = outstanding[sync_id]
        guest_time = result.get("time")
        if (
            isinstance(guest_time, int | float)
            and not isinstance(guest_time, bool)
            and math.isfinite(guest_time)
        ):
            rtt = now - sent
            if self.stats.sync_rtt is None or rtt < self.stats.sync_rtt:  # the tightest exchange wins
                self.stats.sync_rtt = rtt
                self.stats.clock_offset = float(guest_time) - (time.time() - rtt / 2)
        self._last_frame = now
        return True

    def _clock_sync(self, sock: socket.socket, outstanding: dict[int, float]) -> bool:
        """One more sync request once live: the first reply may answer a request queued since boot,
        whose round trip says nothing about the clocks; this one's does. False if the socket failed."""
        sync_id = secrets.randbits(52) + 1
        outstanding[sync_id] = time.monotonic()
        self.stats.syncs_sent += 1
        request = {"jsonrpc": "2.0", "method": wire.SYNC_METHOD, "id": sync_id}
        try:
            sock.sendall(wire.encode_frame(request, marked=True))
        except BlockingIOError:
            pass
        except OSError:
            return False
        return True

    def _invalid(self, why: str) -> bool:
        """Count an invalid frame; False (and the channel cut off) when there were too many."""
        self.stats.invalid += 1
        self.stats.last_invalid = why
        log.debug("live channel %s: invalid frame: %s", self.path, why)
        if self.stats.invalid > self.config.max_invalid:
            self._cut_off(f"more than {self.config.max_invalid} invalid frames; the last: {why}")
            return False
        return True

    def _cut_off(self, why: str) -> None:
        self.stats.cut_off = why
        self._state = "cut-off"
        log.warning("live channel %s cut off: %s", self.path, why)

    def _event(self, event: ChannelEvent) -> None:
        self._last_frame = event.received
        self.stats.events += 1
        if isinstance(event, TaskStarted):
            with self._lock:
                self._started[event.task_id] = event.task
        elif isinstance(event, TaskFinished):
            with self._lock:
                self._finished.add(event.task_id)
        elif isinstance(event, Heartbeat):
            self.stats.guest_dropped = event.dropped
        elif isinstance(event, AgentExit):
            self._exited = True
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            if not self._callback_failed:  # once: a broken callback must not flood the log
                log.exception("live channel %s: the event callback failed", self.path)
            self._callback_failed = True
