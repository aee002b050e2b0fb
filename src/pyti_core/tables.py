"""The tables ``pyti run`` prints, as data: one renderer for the terminal, one for Jupyter.

:func:`run_table` is one run (a row per task); :func:`matrix_table` is several runs of the same
distributions in several environments (a row per distribution and task, a column per environment).
:meth:`Table.text` is what the terminal shows and :meth:`Table.html` the same table for a notebook
(``RunResult._repr_html_`` and ``RunMatrix._repr_html_``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from pyti_core.manager import RunResult
    from pyti_core.rawdata import Environment, RawDataRecord

__all__ = [
    "Table",
    "describe_environment",
    "failure_line",
    "format_table",
    "matrix_table",
    "printable",
    "run_table",
]


@attrs.frozen
class Table:
    """A title, a header, rows of cells (``left`` holds the indexes of left-aligned columns), and lines
    that follow the table (failures, environments, the verdict)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()
    left: frozenset[int] = frozenset({0})

    def text(self) -> str:
        """The table as the terminal shows it (every cell :func:`printable`: much of it is the guest's)."""
        rows = [tuple(printable(c) for c in row) for row in (self.header, *self.rows)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.header))]
        lines = [printable(self.title)]
        for row in rows:
            cells = [c.ljust(widths[i]) if i in self.left else c.rjust(widths[i]) for i, c in enumerate(row)]
            lines.append("  ".join(cells).rstrip())
        lines.extend(printable(note) for note in self.notes)
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The same table as HTML (every value escaped)."""
        esc = html.escape
        align = ["left" if i in self.left else "right" for i in range(len(self.header))]
        head = "".join(
            f'<th style="text-align:{a}">{esc(h)}</th>' for h, a in zip(self.header, align, strict=True)
        )
        body = "".join(
            "<tr>"
            + "".join(f'<td style="text-align:{a}">{esc(c)}</td>' for c, a in zip(row, align, strict=True))
            + "</tr>"
            for row in self.rows
        )
        notes = "".join(f"<div><code>{esc(n.strip())}</code></div>" for n in self.notes)
        return (
            f'<div class="pyti-table"><strong>{esc(self.title)}</strong>'
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}</div>"
        )


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB" if kb else "-"


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control and format characters shown as ``\\xNN``.

    A guest's output may hold escape sequences (``ESC ]52`` writes the clipboard, ``ESC [2J`` clears
    the screen) and bidirectional overrides that make a line read otherwise than it is; none of them
    reaches the terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def failure_line(text: str, limit: int = 200) -> str:
    """The line that says why a task did not pass: pyti's own first line, else the output's last.

    It comes from the guest: it is made :func:`printable` before it is cut to ``limit``.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    line = printable(lines[0] if lines[0].startswith(("pyti", "[pyti")) else lines[-1])
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_environment(env: Environment | None) -> str:
    """One line: implementation and version, OS, kernel, PID 1, CPUs, memory, accelerator."""
    if env is None:
        return "not measured (the guest ran no task)"
    impl = {"cpython": "CPython", "pypy": "PyPy"}.get(env.implementation, env.implementation or "?")
    os_name = env.os_pretty_name or " ".join(p for p in (env.os_name, env.os_version) if p) or "?"
    parts = [
        f"{impl} {env.python_version or '?'}",
        os_name,
        f"kernel {env.kernel or '?'}",
        f"PID 1 {env.init or '?'}",
        f"{env.cpus} CPU",
        f"{env.memory_mib} MiB",
    ]
    if env.accelerator:
        parts.append(env.accelerator.upper())
    return printable(", ".join(parts))  # every name in it was measured by the guest


def _verdict(records: Sequence[RawDataRecord]) -> str:
    bad = [r for r in records if not r.ok]
    if not records:
        return "result: FAILED (no task reported)"
    if bad:
        what = ", ".join(f"{r.task} {r.status}" for r in bad)
        return f"result: FAILED ({len(bad)} of {len(records)} tasks: {what})"
    return f"result: passed ({len(records)} tasks)"


def run_table(result: RunResult) -> Table:
    """One run: a row per task with its status, test counts, time, peak memory and CPU."""
    header = ("task", "status", "passed", "failed", "errors", "skipped", "time", "peak mem", "CPU user+sys")
    rows: list[tuple[str, ...]] = []
    for r in result.report.records:
        t = r.tests
        counts = (str(t.passed), str(t.failed), str(t.errors), str(t.skipped)) if t else ("-",) * 4
        rows.append(
            (
                r.task,
                r.status,
                *counts,
                f"{r.duration_s:.1f} s",
                _mib(r.max_rss_kb),
                f"{r.cpu_user_s:.1f} + {r.cpu_system_s:.1f} s",
            )
        )
    notes: list[str] = []
    if result.report.environment is not None:
        notes.append("environment: " + describe_environment(result.report.environment))
    if result.phases:
        notes.append("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.phases.items()))
    records = result.report.records
    notes.extend(f"  {r.task}: {failure_line(r.stderr or r.stdout)}" for r in records if not r.ok)
    notes.append(_verdict(records))
    return Table(result.distribution, header, tuple(rows), tuple(notes), frozenset({0, 1}))


def format_table(result: RunResult) -> str:
    """The per-task table ``pyti run`` prints for one run."""
    return run_table(result).text()


def _cell(record: RawDataRecord | None) -> str:
    if record is None:
        return "-"
    t = record.tests
    if t is None:
        return record.status
    counts = [
        f"{n} {what}" for n, what in ((t.passed, "passed"), (t.failed, "failed"), (t.errors, "errors")) if n
    ]
    return f"{record.status} ({', '.join(counts) or 'no tests'})"


def _column(result: RunResult, index: int) -> str:
    return result.guest or (
        result.report.environment.label if result.report.environment else f"run {index + 1}"
    )


def matrix_table(results: Sequence[RunResult], title: str = "") -> Table:
    """Several runs: a row per distribution and task, a column per environment (the guest's name).

    Runs of one distribution in different environments share rows; a task an environment did not report
    shows ``-``. The notes name each environment as measured, each failure, and the verdict.
    """
    columns: list[str] = []
    for i, result in enumerate(results):
        name = _column(result, i)
        if name not in columns:
            columns.append(name)
    distributions = list(dict.fromkeys(r.distribution for r in results))
    cells: dict[tuple[str, str], dict[str, RawDataRecord]] = {}
    tasks: dict[str, list[str]] = {d: [] for d in distributions}
    for i, result in enumerate(results):
        column = _column(result, i)
        for record in result.report.records:
            if record.task not in tasks[result.distribution]:
                tasks[result.distribution].append(record.task)
            cells.setdefault((result.distribution, record.task), {})[column] = record
    multi = len(distributions) > 1
    header = ("distribution", "task", *columns) if multi else ("task", *columns)
    rows: list[tuple[str, ...]] = []
    for dist in distributions:
        for task in tasks[dist]:
            row = [_cell(cells[(dist, task)].get(c)) for c in columns]
            rows.append((dist, task, *row) if multi else (task, *row))
    notes: list[str] = []
    for i, result in enumerate(results):
        where = _column(result, i) + (f" {result.distribution}" if multi else "")
        notes.append(f"{where}: {describe_environment(result.report.environment)}")
    for i, result in enumerate(results):
        where = _column(result, i) + (f" {result.distribution}" if multi else "")
        notes.extend(
            f"  {where} {r.task}: {failure_line(r.stderr or r.stdout)}"
            for r in result.report.records
            if not r.ok
        )
        if not result.report.records:
            notes.append(f"  {where}: no task reported")
    failed = [
        _column(r, i) + (f" {r.distribution}" if multi else "") for i, r in enumerate(results) if not r.ok
    ]
    notes.append(
        f"result: FAILED in {len(failed)} of {len(results)} runs ({', '.join(failed)})"
        if failed
        else f"result: passed in all {len(results)} runs"
    )
    left = frozenset({0, 1}) if multi else frozenset({0})
    return Table(title or ", ".join(distributions), header, tuple(rows), tuple(notes), left)
