"""pytest plugin ``pyti_live``: each test's outcome, as pytest reports it, to pyti's agent as it happens.

The agent runs pytest with ``-p pyti_live`` (this file is on the IO disk, its folder on ``PYTHONPATH``)
and ``PYTI_LIVE_SOCKET`` naming a unix datagram socket where it listens; the agent passes each report
on to the host over the live channel. Standard library and pytest's hooks only, for any pytest >= 3
on any Python a guest may have. Without ``PYTI_LIVE_SOCKET`` the plugin does nothing.

The plugin never breaks a test run and hardly slows it: sends are non-blocking datagrams; when the
agent's queue is full a report waits at most 0.2 s for room and is then dropped, and after a drop no
report waits again until the agent keeps up (a stuck agent costs one wait, not one per test); every
failure here is swallowed. Nested pytest runs (a project testing its own
pytest plugin with ``pytester``) report nothing: the plugin takes the variable out of the environment
when the outer session starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from typing import Any

ENV = "PYTI_LIVE_SOCKET"
#: The most one report may hold; longer messages are cut.
MAX_DATAGRAM = 16 * 1024
MAX_MESSAGE = 2000
#: The longest a report waits for room in the agent's queue before it is dropped, in seconds; after a
#: drop, reports do not wait again until one goes through at once (a stuck agent costs one wait).
WAIT_S = 0.2

_claimed = False  # the first session in this process (the outermost) reports; nested ones do not


class _Sender:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(path)  # connected: poll() then says when the agent has room again
        self.sock.setblocking(False)
        self.patient = True

    def send(self, report: dict[str, Any]) -> None:
        data = json.dumps(report, separators=(",", ":")).encode("utf-8", "replace")
        if len(data) > MAX_DATAGRAM:
            report["message"] = ""
            report["nodeid"] = report["nodeid"][:2000]
            data = json.dumps(report, separators=(",", ":")).encode("utf-8", "replace")
        try:
            self.sock.send(data)
            self.patient = True
        except BlockingIOError:  # the agent's queue is full
            if not self.patient:
                return  # it did not keep up last time either: drop without waiting
            with contextlib.suppress(OSError):
                if select.select([], [self.sock], [], WAIT_S)[1]:
                    self.sock.send(data)
                    return
            self.patient = False  # stuck agent: no more waits until a send goes through at once
        except OSError:
            pass  # the agent is gone: reports are advisory

    def close(self) -> None:
        self.sock.close()


class _Reporter:
    """Registered with the outermost session's plugin manager only: nested sessions never reach it."""

    def __init__(self, sender: _Sender, config: Any) -> None:
        self.sender = sender
        self.config = config

    def pytest_runtest_logreport(self, report: Any) -> None:
        self._send(report, str(getattr(report, "when", "call")))

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._send(report, "collect")

    def pytest_unconfigure(self, config: Any) -> None:
        self.sender.close()

    def _send(self, report: Any, when: str) -> None:
        try:
            if when == "collect":
                outcome, word = "error", "ERROR"
            else:
                status = self.config.hook.pytest_report_teststatus(report=report, config=self.config)
                outcome, word = str(status[0]), status[2]
                if isinstance(word, tuple):  # (word, markup)
                    word = word[0]
            if not outcome:
                return  # a setup or teardown that passed has no outcome of its own
            self.sender.send(
                {
                    "nodeid": str(report.nodeid),
                    "outcome": outcome,
                    "word": str(word),
                    "when": when,
                    "duration_s": float(getattr(report, "duration", 0.0) or 0.0),
                    "message": _message(report) if outcome in ("failed", "error") else "",
                }
            )
        except Exception:
            pass


def pytest_configure(config: Any) -> None:
    global _claimed  # noqa: PLW0603 (one reporter per process: the outermost session's)
    path = os.environ.pop(ENV, "")
    if not path or _claimed:
        return
    _claimed = True
    with contextlib.suppress(Exception):
        config.pluginmanager.register(_Reporter(_Sender(path), config), "pyti-live-reporter")


def _message(report: Any) -> str:
    try:
        text = str(report.longreprtext) if report.longrepr is not None else ""
    except Exception:  # a broken repr must not break the run
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    # the last "E   ..." line of a failure is pytest's own summary of it; else the last line
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[-1][:MAX_MESSAGE]
