"""pytest plugin ``pyti_live``: each test's outcome, as pytest reports it, to pyti's agent as it happens.

The agent runs pytest with ``-p pyti_live`` (this file is on the IO disk, its folder on ``PYTHONPATH``)
and ``PYTI_LIVE_SOCKET`` naming a unix datagram socket where it listens; the agent passes each report
on to the host over the live channel. Standard library and pytest's hooks only, for any pytest >= 3
on any Python a guest may have. Without ``PYTI_LIVE_SOCKET`` the plugin does nothing.

The plugin never slows or breaks a test run: sends are non-blocking datagrams, dropped when the agent
does not keep up, and every failure here is swallowed. Nested pytest runs (a project testing its own
pytest plugin with ``pytester``) report nothing: the plugin takes the variable out of the environment
when the outer session starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any

ENV = "PYTI_LIVE_SOCKET"
#: The most one report may hold; longer messages are cut.
MAX_DATAGRAM = 16 * 1024
MAX_MESSAGE = 2000

_sender: _Sender | None = None
_config: Any = None


class _Sender:
    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def send(self, report: dict[str, Any]) -> None:
        data = json.dumps(report, separators=(",", ":")).encode("utf-8", "replace")
        if len(data) > MAX_DATAGRAM:
            report["message"] = ""
            report["nodeid"] = report["nodeid"][:2000]
            data = json.dumps(report, separators=(",", ":")).encode("utf-8", "replace")
        with contextlib.suppress(OSError):  # the agent is not keeping up, or gone: reports are advisory
            self.sock.sendto(data, self.path)

    def close(self) -> None:
        self.sock.close()


def pytest_configure(config: Any) -> None:
    global _sender, _config  # noqa: PLW0603 (one sender per process: the outermost session's)
    path = os.environ.pop(ENV, "")
    if path and _sender is None:
        try:
            _sender = _Sender(path)
        except OSError:
            return
        _config = config


def pytest_unconfigure(config: Any) -> None:
    global _sender, _config
    if _sender is not None and config is _config:
        _sender.close()
        _sender, _config = None, None


def _message(report: Any) -> str:
    try:
        text = str(report.longreprtext) if report.longrepr is not None else ""
    except Exception:  # a broken repr must not break the run
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    # the last "E   ..." line of a failure is pytest's own summary of it; else the last line
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[-1][:MAX_MESSAGE]


def _send(report: Any, when: str) -> None:
    if _sender is None or _config is None:
        return
    try:
        if when == "collect":
            outcome, word = "error", "ERROR"
        else:
            status = _config.hook.pytest_report_teststatus(report=report, config=_config)
            outcome, word = str(status[0]), status[2]
            if isinstance(word, tuple):  # (word, markup)
                word = word[0]
        if not outcome:
            return  # a setup or teardown that passed has no outcome of its own
        _sender.send(
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


def pytest_runtest_logreport(report: Any) -> None:
    _send(report, str(getattr(report, "when", "call")))


def pytest_collectreport(report: Any) -> None:
    if report.failed:
        _send(report, "collect")
