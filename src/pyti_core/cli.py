"""The ``pyti`` command (also ``python -m pyti_core``).

::

    pyti run attrs==23.2.0 --report report.json     test a distribution in a network-less VM
    pyti run --job job.toml                         the same from a job file
    pyti image build                                build (or find) the default system image
    pyti image prepare disk.qcow2                   put the agent and its boot hook into your own image
    pyti farm run a==1 b==2 --ledger farm.sqlite    many jobs on a Dask cluster, results in a durable ledger
    pyti farm worker tcp://HOST:8786 --vms 2        a VM host for a Dask scheduler
    pyti farm status --ledger farm.sqlite           jobs by state, running jobs and their workers

Exit codes: 0 every task passed (or the command succeeded); 1 a task failed, errored or timed out;
2 usage error (bad option, job file or recipe); 3 pyti could not do its work (download, VM, disk image)
— the reason is printed on one line; 130 interrupted.

The library never prints; everything shown here is drawn from its return values and progress callbacks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import attrs

from pyti_core.errors import ConfigError, PytiError, TaskError, vmanager_errors
from pyti_core.tables import failure_line, format_table, printable

if TYPE_CHECKING:
    from distributed.security import Security

    from pyti_core.channel import ChannelConfig, ChannelEvent
    from pyti_core.ledger import LedgerRow
    from pyti_core.manager import RunResult
    from pyti_core.tasks import Recipe

__all__ = [
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ProgressDisplay",
    "format_table",
    "main",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_ERROR: Final = 3
EXIT_INTERRUPTED: Final = 130
DEFAULT_TIMEOUT: Final = 600.0
_ARCHIVE_SUFFIXES: Final = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2", ".tar.xz")


class _UsageError(Exception):
    """A command line that cannot be run (exit code 2)."""


# -- drawing --------------------------------------------------------------------------------------------


class ProgressDisplay:
    """Shows a run's phases on ``stream``: one live status line on a terminal, plain lines otherwise.

    Call it as a :data:`pyti_core.manager.ProgressCallback` (``display(phase, message)``) and give
    :meth:`event` to the run as its live-channel callback: tests then show as they pass and fail. In
    live mode the status line shows the latest test and the counts so far, and each failure stays above
    it with its message; in plain mode every test is a line, a failure's message the line after it. It
    is safe from several threads. :meth:`close` clears the live line.
    """

    def __init__(self, stream: TextIO, *, live: bool | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.prefix = prefix
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._dirty = False
        self._line = ""
        self._counts: dict[str, int] = {}

    def __call__(self, phase: str, message: str) -> None:
        elapsed = time.monotonic() - self._t0
        text = f"{self.prefix}[{elapsed:6.1f} s] {phase}: {printable(message)}"
        with self._lock:
            if self.live:
                if self._counts:
                    text += "  (" + ", ".join(f"{n} {k}" for k, n in self._counts.items()) + ")"
                self._line = text
                width = max(20, _terminal_width() - 1)
                self.stream.write("\r\x1b[K" + text[:width])
                self._dirty = True
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def event(self, event: ChannelEvent, job: str | None = None) -> None:
        """A live-channel event (the run's ``on_event``): counts tests, shows failures with their message."""
        from pyti_core.channel import TestReport  # noqa: PLC0415

        if not isinstance(event, TestReport):
            return
        failed = event.outcome in ("failed", "error")
        with self._lock:
            self._counts[event.outcome] = self._counts.get(event.outcome, 0) + 1
            if not failed or not (self.live or event.message):
                return
            where = f"{job}: " if job else ""
            # word, node id and message come from the guest: no escape sequence reaches the terminal
            said = printable(event.message or "")
            if self.live:  # the failure stays above the status line
                message = f": {said}" if said else ""
                word, nodeid = printable(event.word or "FAILED"), printable(event.nodeid)
                self.stream.write(f"\r\x1b[K{self.prefix}{where}{word} {nodeid}{message}\n")
                if self._dirty:
                    self.stream.write(self._line[: max(20, _terminal_width() - 1)])
            else:
                self.stream.write(f"{self.prefix}{where}    {said}\n")
            self.stream.flush()

    def job(self, job: str, phase: str, message: str) -> None:
        """The TaskManager's form: ``(job name, phase, message)``."""
        self(phase, f"{job}: {message}")

    def job_event(self, job: str, event: ChannelEvent) -> None:
        """The TaskManager's form of :meth:`event`."""
        self.event(event, job)

    def close(self) -> None:
        with self._lock:
            if self.live and self._dirty:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._dirty = False


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 80


# -- commands ---------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.channel import ChannelConfig  # noqa: PLC0415 (keeps `pyti --help` fast)
    from pyti_core.config import JobConfig  # noqa: PLC0415
    from pyti_core.manager import GuestSystem, run  # noqa: PLC0415
    from pyti_core.packages import DEBIAN_12  # noqa: PLC0415
    from pyti_core.task_manager import TaskManager  # noqa: PLC0415
    from pyti_core.tasks import get_recipe  # noqa: PLC0415

    config = JobConfig.from_toml(args.job) if args.job else None
    specs: list[str | Path] = [_spec(s) for s in args.spec] or ([config.distribution] if config else [])
    if not specs:
        raise _UsageError(
            "run: give a distribution (attrs==23.2.0, a wheel, an sdist, a folder) or --job FILE"
        )
    recipe = get_recipe(args.recipe) if args.recipe else (config.recipe if config else get_recipe("default"))
    timeout = args.timeout or (config.job_timeout if config and config.job_timeout else DEFAULT_TIMEOUT)
    cache_dir = args.cache_dir or (config.cache_dir if config else None)
    report_path = args.report or (config.report if config else None)
    find_links = [*(config.find_links if config else ()), *args.find_links]
    no_index = args.no_index or (config.no_index if config else False)
    index_url = args.index_url or (config.index_url if config else None)
    guest = None
    if config is not None and config.target != DEBIAN_12:  # the default guest, told it is another
        guest = attrs.evolve(
            GuestSystem.default(cache_dir / "guest" if cache_dir else None), target=config.target
        )
    channel = config.channel if config is not None else ChannelConfig()
    if args.no_channel:
        channel = None
    elif args.stall_timeout is not None:
        try:
            channel = attrs.evolve(channel or ChannelConfig(), stall_timeout=args.stall_timeout)
        except ConfigError as exc:
            raise _UsageError(f"run: --stall-timeout: {exc}") from None
    pythons = _guest_pythons(args.python, "run") if args.python is not None else []
    if pythons and args.guest is not None:
        raise _UsageError("run: --python builds tiny guests; --guest boots your own disk: give one of them")
    if pythons:
        return _run_matrix(args, out, err, specs, pythons, recipe, timeout, cache_dir, report_path, channel)
    if args.guest is not None:
        if not args.guest.is_file():
            raise _UsageError(f"run: --guest {args.guest}: no such disk image")
        # read before anything is downloaded or booted: an image without pyti's hook is refused here;
        # its own Python and glibc decide the wheels
        guest = GuestSystem.from_image(args.guest)
    display = ProgressDisplay(err, live=args.live)
    try:
        if len(specs) == 1:
            results = [
                run(
                    specs[0],
                    recipe=recipe,
                    timeout=timeout,
                    work_dir=args.work_dir,
                    uri=args.uri,
                    guest=guest,
                    progress=display,
                    on_event=display.event,
                    channel=channel,
                    cache_dir=cache_dir,
                    keep=args.keep,
                    find_links=find_links,
                    no_index=no_index,
                    index_url=index_url,
                )
            ]
        else:
            with TaskManager(
                args.max_vms,
                guest=guest,
                uri=args.uri,
                work_dir=args.work_dir,
                cache_dir=cache_dir,
                progress=display.job,
                on_event=display.job_event,
                channel=channel,
                keep=args.keep,
                find_links=find_links,
                no_index=no_index,
                index_url=index_url,
            ) as manager:
                results = manager.run_all(specs, recipe=recipe, timeout=timeout)
    finally:
        display.close()
    for i, result in enumerate(results):
        if i:
            out.write("\n")
        out.write(format_table(result))
        if result.work_dir is not None:
            out.write(f"files kept in {result.work_dir}\n")
    if report_path is not None:
        for result, path in zip(results, _report_paths(Path(report_path), results), strict=True):
            path.write_text(result.report.to_json() + "\n", encoding="utf-8")
            out.write(f"report written to {path}\n")
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED


def _run_matrix(  # noqa: PLR0917 (the run command's parts, called once)
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    specs: Sequence[str | Path],
    pythons: Sequence[str],
    recipe: Recipe,
    timeout: float,
    cache_dir: Path | None,
    report_path: Path | None,
    channel: ChannelConfig | None,
) -> int:
    """``pyti run SPEC... --python A,B``: every spec in every guest, through the TaskManager."""
    from pyti_core.manager import GuestSystem, RunMatrix  # noqa: PLC0415
    from pyti_core.task_manager import TaskManager  # noqa: PLC0415

    display = ProgressDisplay(err, live=args.live)
    try:
        guests = []
        for name in pythons:
            display("guest", f"building (or reusing) the Python {name} guest")
            guests.append(GuestSystem.for_python(name, cache_dir / "guest" if cache_dir else None))
        with TaskManager(
            args.max_vms,
            uri=args.uri,
            work_dir=args.work_dir,
            cache_dir=cache_dir,
            progress=display.job,
            on_event=display.job_event,
            channel=channel,
            keep=args.keep,
            find_links=args.find_links,
            no_index=args.no_index,
            index_url=args.index_url,
        ) as manager:
            # the slowest guests (PyPy under emulation) first, so the others fill the other VM slots
            # meanwhile; the table keeps the order asked for
            pairs = [(spec, guest) for spec in specs for guest in guests]
            order = sorted(range(len(pairs)), key=lambda i: pairs[i][1].target.implementation != "pp")
            futures = {
                i: manager.submit(
                    pairs[i][0], recipe=recipe, timeout=timeout, guest=pairs[i][1],
                    name=_job_name(pairs[i][0], pairs[i][1].name),
                )
                for i in order
            }  # fmt: skip
            matrix = RunMatrix([futures[i].result() for i in range(len(pairs))])
    finally:
        display.close()
    out.write(str(matrix))
    for result in matrix:
        if result.work_dir is not None:
            out.write(f"files kept in {result.work_dir}\n")
    if report_path is not None:
        for result, path in zip(matrix, _report_paths(Path(report_path), matrix.results), strict=True):
            path.write_text(result.report.to_json() + "\n", encoding="utf-8")
            out.write(f"report written to {path}\n")
    return EXIT_OK if matrix.ok else EXIT_FAILED


def _job_name(spec: str | Path, python: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(spec).name if isinstance(spec, Path) else spec).strip("-.")
    env = python if python.startswith("pypy") else f"py{python}"
    return f"pyti-{stem[:30] or 'dist'}-{env}-{os.urandom(3).hex()}"


def _spec(text: str) -> str | Path:
    """A path when it looks like one (a ``/``, ``~``, or an archive's suffix), else a requirement."""
    if "/" in text or text.startswith("~") or text.endswith(_ARCHIVE_SUFFIXES):
        path = Path(text).expanduser()
        if not path.exists():
            raise _UsageError(f"run: {text}: no such file or folder")
        return path
    return text


def _report_stem(result: RunResult) -> str:
    """``six-1.16.0``, and with a named guest ``six-1.16.0-py3.9`` / ``six-1.16.0-pypy3``."""
    stem = result.distribution.replace("==", "-")
    if result.guest:
        stem += "-" + (result.guest if result.guest.startswith("pypy") else "py" + result.guest)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")


def _report_paths(report: Path, results: Sequence[RunResult]) -> list[Path]:
    """One run: the file itself. Several: a folder of ``<name>-<version>[-<guest>].json`` files."""
    if len(results) == 1:
        return [report]
    report.mkdir(parents=True, exist_ok=True)
    names = [_report_stem(r) for r in results]
    return [
        report / f"{n or 'run'}-{i + 1}.json" if names.count(n) > 1 else report / f"{n}.json"
        for i, n in enumerate(names)
    ]


_SIZE: Final = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)


def _size(text: str) -> int:
    """``2G``, ``1536M``, ``4GiB`` or a number of bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 1536M)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]


def _cmd_image_build_system(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.guest.system import (  # noqa: PLC0415
        DEFAULT_SIZE,
        build_system_disk,
        default_cache_dir,
        write_system_disk,
    )

    if args.output is None:
        raise _UsageError("image build --os: say where the disk goes with --output FILE")
    output = Path(args.output)
    if output.exists() and not args.force:
        raise _UsageError(f"image build: {output} exists; pass --force to replace it")
    cache = args.cache_dir / "system" if args.cache_dir else default_cache_dir()
    display = ProgressDisplay(err, live=False)
    display("build", f"building (or reusing) the {args.os} system disk in {cache}")
    started = time.monotonic()
    build = build_system_disk(
        args.os,
        cache_dir=cache,
        size=args.size or DEFAULT_SIZE,
        rebuild=args.rebuild,
        progress=lambda message: display("build", message),
    )
    display("write", f"writing {output} ({args.format or 'format from its suffix'})")
    write_system_disk(build, output, args.format, overwrite=args.force)
    out.write(
        f"{output}: {build.release.name} ({build.release.suite}), kernel {build.kernel_release}, "
        f"python3 {build.python_version}, {build.size >> 20} MiB disk, "
        f"{output.stat().st_size / (1 << 20):.0f} MiB file, {time.monotonic() - started:.1f} s\n"
        f"run with: pyti run SPEC --guest {output}\n"
    )
    return EXIT_OK


def _cmd_image_build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.image import build_default_image  # noqa: PLC0415

    if args.os is not None:
        return _cmd_image_build_system(args, out, err)
    if args.output is not None or args.format is not None:
        raise _UsageError("image build: --output and --format go with --os (a system disk)")
    if args.python is None:
        err.write(
            "pyti: building (or reusing) the tiny Python guest; the first build downloads Debian packages\n"
        )
        guest = build_default_image(args.cache_dir)
        out.write(f"kernel:  {guest.kernel}\ninitrd:  {guest.initrd}\ncmdline: {guest.cmdline}\n")
        return EXIT_OK
    from pyti_core.manager import GuestSystem  # noqa: PLC0415

    for name in _guest_pythons(args.python, "image build"):
        err.write(f"pyti: building (or reusing) the Python {name} guest\n")
        guest = GuestSystem.for_python(name, args.cache_dir, refresh=args.refresh)
        tooling = ", ".join(f"{k} {v}" for k, v in sorted(guest.preinstalled.items()))
        out.write(
            f"{name}: {guest.target.describe()}\n  kernel:  {guest.kernel}\n  initrd:  {guest.initrd}\n"
            f"  preinstalled: {tooling or 'nothing'}\n"
        )
    return EXIT_OK


def _guest_pythons(text: str, command: str) -> list[str]:
    """``--python 3.9,3.13`` -> ``["3.9", "3.13"]``; an unknown name is a usage error listing the choices."""
    from pyti_core.guest.tinylinux import INTERPRETERS  # noqa: PLC0415

    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in INTERPRETERS]
    if unknown or not names:
        raise _UsageError(
            f"{command}: --python {', '.join(unknown) or repr(text)}: not a guest Python pyti can build; "
            f"choose from {', '.join(INTERPRETERS)} (a comma-separated list)"
        )
    return names


def _cmd_image_prepare(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.image import prepare_image  # noqa: PLC0415

    prepared = prepare_image(
        args.disk, partition=args.partition, init=args.init, require_python=not args.no_python_check
    )
    out.write(f"{prepared.image}: pyti agent installed ({prepared.init})\n")
    for path in prepared.files:
        out.write(f"  {path}\n")
    if prepared.python is None:
        err.write("pyti: warning: no python3 found in the image; install Python 3.8+ before using it\n")
    return EXIT_OK


# -- pyti farm ------------------------------------------------------------------------------------------


def _pythons(text: str) -> list[str]:
    """``3.9,3.13`` -> ``["3.9", "3.13"]``."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    for item in items:
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}|pypy\d{0,2}(\.\d{1,3})?", item):
            raise argparse.ArgumentTypeError(f"not a Python version: {item!r} (expected e.g. 3.12 or pypy3)")
    if not items:
        raise argparse.ArgumentTypeError("give at least one Python version, e.g. 3.12")
    return items


def _farm_security(args: argparse.Namespace) -> Security | None:
    from pyti_core.farm import security_from_files  # noqa: PLC0415

    given = [args.tls_ca_file, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    if args.tls_ca_file is None or args.tls_cert is None:
        raise _UsageError("TLS needs --tls-ca-file and --tls-cert (and --tls-key unless the cert holds it)")
    return security_from_files(args.tls_ca_file, args.tls_cert, args.tls_key)


def _cmd_farm_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.farm import run_many  # noqa: PLC0415
    from pyti_core.ledger import Ledger  # noqa: PLC0415

    specs = [_spec(s) for s in args.spec]
    display = ProgressDisplay(err, live=args.live)
    try:
        with run_many(
            specs,
            ledger=args.ledger,
            scheduler=args.scheduler,
            security=_farm_security(args),
            pythons=args.python,
            recipe=args.recipe,
            timeout=args.timeout or DEFAULT_TIMEOUT,
            max_vms=args.max_vms,
            work_dir=args.work_dir,
            cache_dir=args.cache_dir,
            uri=args.uri,
            find_links=args.find_links,
            no_index=args.no_index,
            index_url=args.index_url,
            retry_failed=args.retry_failed,
            allowed_failures=args.allowed_failures,
            progress=display.job,
        ) as farm:
            for _ in farm:
                pass
            keys = [job.key for job in farm.jobs]
    finally:
        display.close()
    with Ledger(args.ledger, create=False) as ledger:
        rows = [row for row in (ledger.get(k) for k in keys) if row is not None]
    for row in rows:
        verdict = "passed" if row.ok else ("failed" if row.state == "done" else row.state.upper())
        name = row.distribution or row.spec
        out.write(f"{verdict:7} {name} [{row.environment}]  ({row.attempts} attempt(s))\n")
        bad = [r for r in row.records if not r.ok]
        for r in bad[:3]:
            out.write(f"          {r.task} {r.status}: {failure_line(r.stderr or r.stdout)}\n")
        if row.state == "failed":
            out.write(f"          {failure_line(row.reason or '')}\n")
    passed = sum(1 for r in rows if r.ok)
    out.write(f"{passed} of {len(rows)} job(s) passed; ledger {args.ledger}\n")
    if args.report is not None:
        for path in _write_farm_reports(rows, args.report):
            out.write(f"report written to {path}\n")
    return EXIT_OK if rows and passed == len(rows) else EXIT_FAILED


def _write_farm_reports(rows: Sequence[LedgerRow], folder: Path) -> list[Path]:
    """One JSON report per job (spec x environment) in ``folder``; a job without records (failed) gets
    one ``error`` record saying why.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    used: set[str] = set()
    for row in rows:
        if row.state not in ("done", "failed"):
            continue
        result = row.to_result()
        env = "" if row.environment == "default" else f"-{row.environment}"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{result.distribution.replace('==', '-')}{env}")
        stem = stem.strip("-.") or "job"
        if stem in used:
            stem = f"{stem}-{row.key[:8]}"
        used.add(stem)
        path = folder / f"{stem}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(result.report.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return written


def _cmd_farm_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.ledger import Ledger  # noqa: PLC0415

    with Ledger(args.ledger, create=False) as ledger:
        rows = ledger.rows()
    paths = _write_farm_reports(rows, args.report)
    for path in paths:
        out.write(f"report written to {path}\n")
    unfinished = len(rows) - len(paths)
    if unfinished:
        err.write(f"pyti: {unfinished} job(s) not finished yet have no report; rerun `pyti farm run`\n")
    return EXIT_OK


def _cmd_farm_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.ledger import Ledger  # noqa: PLC0415

    with Ledger(args.ledger, create=False) as ledger:
        counts = ledger.counts()
        rows = ledger.rows()
    total = sum(counts.values())
    summary = ", ".join(f"{state} {n}" for state, n in counts.items())
    out.write(f"{args.ledger}: {total} job(s): {summary}\n")
    for state in ("running", "failed", "pending", "done"):
        these = [r for r in rows if r.state == state]
        if not these:
            continue
        out.write(f"{state}:\n")
        for r in these:
            name = f"{r.distribution or r.spec} [{r.environment}]"
            if state == "running":
                since = time.strftime("%H:%M:%S", time.localtime(r.started_at or r.submitted_at))
                out.write(f"  {name}  on {r.worker} since {since} (attempt {r.attempts})\n")
            elif state == "failed":
                out.write(f"  {name}  after {r.attempts} attempt(s): {failure_line(r.reason or '')}\n")
            elif state == "done":
                verdict = "passed" if r.ok else "failed"
                out.write(f"  {name}  {verdict} on {r.worker} ({r.attempts} attempt(s))\n")
            else:
                out.write(f"  {name}  waiting ({r.attempts} attempt(s) so far)\n")
    return EXIT_OK


def _cmd_farm_worker(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio  # noqa: PLC0415

    from pyti_core.farm import FarmWorkerPlugin, serve_worker  # noqa: PLC0415

    if args.uri is None and shutil.which("qemu-system-x86_64") is None:
        raise PytiError("no qemu-system-x86_64 on this host: install QEMU (or give --uri) to run VMs here")
    security = _farm_security(args)
    plugin = FarmWorkerPlugin(work_dir=args.work_dir, cache_dir=args.cache_dir, uri=args.uri)

    def ready(address: str) -> None:
        out.write(
            f"pyti farm worker: {address} joined {args.scheduler} with {args.vms} VM slot(s); "
            "stop with Ctrl-C\n"
        )
        out.flush()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(
            args.scheduler,
            vms=args.vms,
            host=args.host,
            name=args.name,
            security=security,
            plugin=plugin,
            nanny=not args.no_nanny,
            stop=stop,
            ready=ready,
        )

    asyncio.run(serve())
    out.write("pyti farm worker: stopped\n")
    return EXIT_OK


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca-file", type=Path, help="TLS: the CA that signed every farm certificate")
    p.add_argument("--tls-cert", type=Path, help="TLS: this party's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="TLS: its private key (PEM), if not in --tls-cert")


def _add_farm_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    farm = sub.add_parser("farm", help="many jobs on many VM hosts (Dask distributed), with a durable ledger")
    fsub = farm.add_subparsers(dest="farm_command", required=True, metavar="ACTION")
    r = fsub.add_parser("run", help="run SPEC x --python jobs on a Dask cluster; results go to the ledger")
    r.add_argument("spec", nargs="+", help="attrs==23.2.0, or a wheel, an sdist or a project folder")
    r.add_argument("--ledger", type=Path, required=True, help="the SQLite ledger (created; rerun resumes)")
    r.add_argument("--python", type=_pythons, help="environments: Python versions, e.g. 3.11,3.12")
    r.add_argument("--report", type=Path, help="write one JSON report per job into this folder")
    r.add_argument("--scheduler", help="a Dask scheduler, tcp://HOST:8786 (default: a local cluster)")
    r.add_argument("--max-vms", type=_count, help="local cluster: VMs at once (default: cores, memory)")
    r.add_argument("--recipe", default="default", help="default, unittest or install-only")
    r.add_argument("--timeout", type=_positive_float, help=f"seconds per job (default {DEFAULT_TIMEOUT:g})")
    r.add_argument("--retry-failed", action="store_true", help="run jobs the ledger has as failed again")
    r.add_argument(
        "--allowed-failures",
        type=int,
        help="local cluster: worker deaths a job may cause before it fails (Dask's default: 3)",
    )
    r.add_argument("--uri", help="hypervisor URI on the workers (default: theirs)")
    r.add_argument("--cache-dir", type=Path, help="local cluster: pyti's cache (guest build, pip cache)")
    r.add_argument("--work-dir", type=Path, help="local cluster: the workers' slots")
    r.add_argument("--find-links", type=Path, action="append", default=[], help="extra folder of wheels")
    r.add_argument("--no-index", action="store_true", help="resolve from --find-links folders only")
    r.add_argument("--index-url", help="another package index")
    _add_tls_arguments(r)
    live = r.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_true", default=None, help="one live status line")
    live.add_argument("--plain", dest="live", action="store_false", help="plain progress lines")

    w = fsub.add_parser("worker", help="run VMs for a Dask scheduler: a worker with --vms VM slots")
    w.add_argument("scheduler", help="the scheduler's address, tcp://HOST:8786 (tls://... with TLS)")
    w.add_argument("--vms", type=_count, default=1, help="VMs this host runs at once (default 1)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    w.add_argument("--name", help="the worker's name (default: Dask's)")
    w.add_argument("--work-dir", type=Path, help="slots: libvirt roots and job folders")
    w.add_argument("--cache-dir", type=Path, help="pyti's cache (guest build, pip cache)")
    w.add_argument("--uri", help="hypervisor URI (default: libvirt's QEMU driver in the worker process)")
    w.add_argument("--no-nanny", action="store_true", help="do not restart the worker process if it dies")
    _add_tls_arguments(w)

    st = fsub.add_parser("status", help="jobs by state, running jobs and their workers, failures")
    st.add_argument("--ledger", type=Path, required=True, help="the ledger")
    rp = fsub.add_parser("report", help="write one JSON report per finished job")
    rp.add_argument("--ledger", type=Path, required=True, help="the ledger")
    rp.add_argument("--report", type=Path, required=True, help="the folder for the reports")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyti`` argument parser (sub-commands ``run``, ``image``, ``farm``)."""
    parser = argparse.ArgumentParser(
        prog="pyti",
        description="Test Python distributions inside clean, network-less virtual machines.",
        epilog="exit codes: 0 passed, 1 a task failed or timed out, 2 usage error, 3 pyti error, "
        "130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="test one distribution in a fresh VM and print a table per task")
    p.add_argument(
        "spec",
        nargs="*",
        help="attrs==23.2.0, or a wheel, an sdist or a project folder; several run in parallel VMs",
    )
    p.add_argument("--max-vms", type=_count, help="guests at once for several specs (default: cores, memory)")
    p.add_argument("--job", type=Path, help="a TOML job file (options given here override it)")
    p.add_argument("--recipe", help="default, unittest or install-only (default: default)")
    p.add_argument(
        "--report", type=Path, help="write the JSON report here (several specs: a folder of reports)"
    )
    p.add_argument(
        "--timeout", type=_positive_float, help=f"seconds for the guest's run (default {DEFAULT_TIMEOUT:g})"
    )
    p.add_argument("--uri", help="hypervisor URI (default: libvirt's QEMU driver inside this process)")
    p.add_argument(
        "--guest",
        type=Path,
        metavar="IMAGE",
        help="boot this system disk through the BIOS instead of the tiny guest "
        "(made by `pyti image build --os`, or any image `pyti image prepare` made ready)",
    )
    p.add_argument(
        "--python",
        metavar="LIST",
        help="test in tiny guests with these Pythons, each from the Debian suite that ships it: any of "
        "3.9, 3.11, 3.13, 3.14, pypy3, comma-separated (one table, a column per guest)",
    )
    p.add_argument("--cache-dir", type=Path, help="pyti's cache (guest build, pip cache)")
    p.add_argument("--work-dir", type=Path, help="where the run's files go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the run's files (IO disk, serial log)")
    p.add_argument(
        "--find-links", type=Path, action="append", default=[], help="extra folder of wheels/sdists"
    )
    p.add_argument("--no-index", action="store_true", help="resolve from --find-links folders only")
    p.add_argument("--index-url", help="another package index")
    p.add_argument(
        "--stall-timeout",
        type=_positive_float,
        help="stop a guest whose agent has been silent this many seconds on the live channel (default 30)",
    )
    p.add_argument(
        "--no-channel", action="store_true", help="no live channel: no test events, no stall detection"
    )
    live = p.add_mutually_exclusive_group()
    live.add_argument(
        "--live",
        dest="live",
        action="store_true",
        default=None,
        help="one live status line, failures above it",
    )
    live.add_argument("--plain", dest="live", action="store_false", help="plain lines, one per test")

    image = sub.add_parser("image", help="system images: build the default one, prepare your own")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser(
        "build", help="build (or find in the cache) the tiny Python guest, or a system disk (--os)"
    )
    b.add_argument("--cache-dir", type=Path, help="where the build is cached")
    b.add_argument(
        "--python", metavar="LIST", help="build the tiny guests with these Pythons (3.9,3.13,pypy3...)"
    )
    b.add_argument("--refresh", action="store_true", help="fetch the Debian package lists again first")
    b.add_argument(
        "--os",
        choices=("debian-12", "debian-13"),
        help="build a bootable system disk of this Debian release instead (systemd, GRUB, pyti's hook)",
    )
    b.add_argument("--output", type=Path, help="with --os: the disk image to write")
    b.add_argument(
        "--format",
        choices=("vdi", "qcow2", "vmdk", "vhd", "raw"),
        help="with --os: the image format (default: from the output's suffix)",
    )
    b.add_argument("--size", type=_size, help="with --os: the disk's virtual size (default 2G)")
    b.add_argument("--rebuild", action="store_true", help="with --os: build afresh, ignoring the cache")
    b.add_argument("--force", action="store_true", help="with --os: replace an existing output")
    pr = isub.add_parser(
        "prepare", help="install the agent and its boot hook into a disk image, without booting"
    )
    pr.add_argument("disk", type=Path, help="the disk image (qcow2, VDI, VMDK, VHD or raw)")
    pr.add_argument("--partition", type=_count, help="the root filesystem's partition (default: the largest)")
    pr.add_argument(
        "--init", choices=("systemd", "sysv"), help="force the boot hook's kind (default: detected)"
    )
    pr.add_argument("--no-python-check", action="store_true", help="do not require python3 in the image")

    _add_farm_parser(sub)
    return parser


def _quiet_libvirt() -> None:
    """Send libvirt's own warnings to a log file instead of over the progress display.

    The embedded driver logs a "tainted: high-privileges" warning per VM started as root; libvirt reads
    ``LIBVIRT_LOG_OUTPUTS`` once, when it is loaded, so this must happen before the first VM. A value
    the user set is kept.
    """
    if "LIBVIRT_LOG_OUTPUTS" in os.environ or "libvirt" in sys.modules:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyti"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    os.environ["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{cache / 'libvirt.log'}"


def _message(exc: BaseException) -> str:
    """The error's own message (no traceback); multi-line only when it carries a log tail.

    A log tail is the guest's console: each line is made :func:`printable`.
    """
    text = str(exc).strip() or type(exc).__name__
    return "\n".join(printable(line) for line in text.split("\n"))


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the ``pyti`` command; return its exit code."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    _quiet_libvirt()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage message
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    commands: dict[str, Callable[[], int]] = {
        "run": lambda: _cmd_run(args, out, err),
        "farm": lambda: _FARM_COMMANDS[args.farm_command](args, out, err),
        "image": lambda: (_cmd_image_build if args.image_command == "build" else _cmd_image_prepare)(
            args, out, err
        ),
    }
    from diskhandler.errors import DiskHandlerError  # noqa: PLC0415

    # vmanager's errors are () without libvirt-python: `pyti image prepare` and friends still work
    failures: tuple[type[Exception], ...] = (PytiError, *vmanager_errors(), DiskHandlerError, OSError)

    try:
        return commands[args.command]()
    except _UsageError as exc:
        err.write(f"pyti: usage error: {exc}\n")
        return EXIT_USAGE
    except (ConfigError, TaskError) as exc:
        err.write(f"pyti: error: {_message(exc)}\n")
        return EXIT_USAGE
    except failures as exc:
        err.write(f"pyti: error: {_message(exc)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        err.write("pyti: interrupted\n")
        return EXIT_INTERRUPTED


_FARM_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]]] = {
    "run": _cmd_farm_run,
    "worker": _cmd_farm_worker,
    "status": _cmd_farm_status,
    "report": _cmd_farm_report,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
