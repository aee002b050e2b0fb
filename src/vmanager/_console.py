"""The serial console: the log file QEMU writes, and libvirt's console stream for typing and reading.

:meth:`SerialConsole.expect` reads what the guest writes after the stream was opened;
:func:`read_log` reads the serial log file from the start of the run (boot messages included).
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ._libvirt import ConsoleStream, Domain
from .errors import VMStateError, VMTimeoutError
from .state import ACTIVE, RunState

__all__ = ["SerialConsole", "read_log", "tail"]

POLL: Final = 0.05
_KEEP: Final = 4 << 20


def tail(text: str, limit: int = 400) -> str:
    text = text[-limit:]
    return f"last output: {text!r}" if text else "no output"


def read_log(log: Path) -> str:
    """Everything in a serial log file (empty before the guest wrote anything)."""
    try:
        return log.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _utf8_decoder() -> codecs.IncrementalDecoder:
    """Decodes console bytes that may split a character between two reads."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class SerialConsole:
    """libvirt's console stream of one domain, with a buffer of what was read but not yet matched."""

    __slots__ = ("_buf", "_decoder", "_dom", "_state", "_stream")

    def __init__(self, dom: Domain, state: Callable[[], RunState]) -> None:
        self._dom = dom
        self._state = state
        self._stream: ConsoleStream | None = None
        self._buf = ""
        self._decoder = _utf8_decoder()

    def reset(self) -> None:
        """Close the stream and forget unread output (the guest went away or was replaced)."""
        if self._stream is None and not self._buf:
            return  # nothing was read since the last reset
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._buf = ""
        self._decoder = _utf8_decoder()

    def _open(self) -> ConsoleStream:
        if self._stream is None or self._stream.closed:
            state = self._state()
            allowed = (RunState.RUNNING, RunState.BLOCKED, RunState.PAUSED)
            if state not in allowed:
                raise VMStateError(self._dom.name, "open the console of", state, allowed)
            self._stream = self._dom.open_console()
        return self._stream

    def _drain(self) -> bool:
        """Move what the console has into the buffer; False at end of stream."""
        data = self._open().read_available()
        if data:
            self._buf += self._decoder.decode(data)
            if len(self._buf) > _KEEP:  # nobody matched it for megabytes: keep the tail
                self._buf = self._buf[-_KEEP:]
        return data is not None

    def write(self, text: str | bytes, timeout: float) -> None:
        data = text.encode() if isinstance(text, str) else bytes(text)
        stream = self._open()
        deadline = time.monotonic() + timeout
        while data:
            sent = stream.send(data)
            data = data[sent:]
            if data:
                if time.monotonic() >= deadline:
                    raise VMTimeoutError(
                        self._dom.name, "console write", timeout, f"{len(data)} bytes unsent"
                    )
                self._drain()
                time.sleep(POLL / 5)

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            alive = self._drain()
            match = regex.search(self._buf)
            if match is not None:
                self._buf = self._buf[match.end() :]  # consumed
                return match
            if not alive:
                state = self._state()
                if state not in ACTIVE:
                    raise VMStateError(self._dom.name, "read the console of", state, (RunState.RUNNING,))
                self._stream = None  # the stream ended under a running guest: open a new one
            if time.monotonic() >= deadline:
                raise VMTimeoutError(
                    self._dom.name, f"console expect {regex.pattern!r}", timeout, tail(self._buf)
                )
            time.sleep(POLL / 2)
