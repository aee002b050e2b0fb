"""The ``pyti`` command (also ``python -m pyti_core``).

::

    pyti run attrs==23.2.0 --report report.json     test a distribution in a network-less VM
    pyti run --job job.toml                         the same from a job file
    pyti image build                                build (or find) the default system image
    pyti image prepare disk.qcow2                   put the agent and its boot hook into your own image

Exit codes: 0 every task passed (or the command succeeded); 1 a task failed, errored or timed out;
2 usage error (bad option, job file or recipe); 3 pyti could not do its work (download, VM, disk image)
— the reason is printed on one line; 130 interrupted.

The library never prints; everything shown here is drawn from its return values and progress callbacks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import attrs

from pyti_core.errors import ConfigError, PytiError, TaskError, vmanager_errors

if TYPE_CHECKING:
    from pyti_core.manager import RunResult

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

    Call it as a :data:`pyti_core.manager.ProgressCallback` (``display(phase, message)``); it is safe
    from several threads. :meth:`close` clears the live line.
    """

    def __init__(self, stream: TextIO, *, live: bool | None = None, prefix: str = "") -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.prefix = prefix
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._dirty = False

    def __call__(self, phase: str, message: str) -> None:
        elapsed = time.monotonic() - self._t0
        text = f"{self.prefix}[{elapsed:6.1f} s] {phase}: {message}"
        with self._lock:
            if self.live:
                width = max(20, _terminal_width() - 1)
                self.stream.write("\r\x1b[K" + text[:width])
                self._dirty = True
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def job(self, job: str, phase: str, message: str) -> None:
        """The TaskManager's form: ``(job name, phase, message)``."""
        self(phase, f"{job}: {message}")

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


def _mib(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB" if kb else "-"


def _why(text: str, limit: int = 200) -> str:
    """The line that says why a task did not pass: pyti's own first line, else the output's last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no output)"
    line = lines[0] if lines[0].startswith(("pyti", "[pyti")) else lines[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def format_table(result: RunResult) -> str:
    """The per-task table ``pyti run`` prints: status, test counts, time, peak memory, CPU."""
    header = ("task", "status", "passed", "failed", "errors", "skipped", "time", "peak mem", "CPU user+sys")
    rows: list[tuple[str, ...]] = [header]
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = {0, 1}
    lines = [result.distribution]
    for row in rows:
        cells = [c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    if result.phases:
        lines.append("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.phases.items()))
    bad = [r for r in result.report.records if not r.ok]
    for r in bad:
        lines.append(f"  {r.task}: {_why(r.stderr or r.stdout)}")
    if not result.report.records:
        lines.append("result: FAILED (no task reported)")
    elif bad:
        what = ", ".join(f"{r.task} {r.status}" for r in bad)
        lines.append(f"result: FAILED ({len(bad)} of {len(result.report.records)} tasks: {what})")
    else:
        lines.append(f"result: passed ({len(result.report.records)} tasks)")
    return "\n".join(lines) + "\n"


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
    from pyti_core.config import JobConfig  # noqa: PLC0415 (keeps `pyti --help` fast)
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


def _spec(text: str) -> str | Path:
    """A path when it looks like one (a ``/``, ``~``, or an archive's suffix), else a requirement."""
    if "/" in text or text.startswith("~") or text.endswith(_ARCHIVE_SUFFIXES):
        path = Path(text).expanduser()
        if not path.exists():
            raise _UsageError(f"run: {text}: no such file or folder")
        return path
    return text


def _report_paths(report: Path, results: Sequence[RunResult]) -> list[Path]:
    """One run: the file itself. Several: a folder of ``<name>-<version>.json`` files."""
    if len(results) == 1:
        return [report]
    report.mkdir(parents=True, exist_ok=True)
    names = [re.sub(r"[^A-Za-z0-9._-]+", "-", r.distribution.replace("==", "-")).strip("-.") for r in results]
    return [
        report / f"{n or 'run'}-{i + 1}.json" if names.count(n) > 1 else report / f"{n}.json"
        for i, n in enumerate(names)
    ]


def _cmd_image_build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from pyti_core.image import build_default_image  # noqa: PLC0415

    err.write(
        "pyti: building (or reusing) the tiny Python guest; the first build downloads Debian packages\n"
    )
    guest = build_default_image(args.cache_dir)
    out.write(f"kernel:  {guest.kernel}\ninitrd:  {guest.initrd}\ncmdline: {guest.cmdline}\n")
    return EXIT_OK


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


def build_parser() -> argparse.ArgumentParser:
    """The ``pyti`` argument parser (sub-commands ``run``, ``image``)."""
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
    p.add_argument("--cache-dir", type=Path, help="pyti's cache (guest build, pip cache)")
    p.add_argument("--work-dir", type=Path, help="where the run's files go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the run's files (IO disk, serial log)")
    p.add_argument(
        "--find-links", type=Path, action="append", default=[], help="extra folder of wheels/sdists"
    )
    p.add_argument("--no-index", action="store_true", help="resolve from --find-links folders only")
    p.add_argument("--index-url", help="another package index")
    live = p.add_mutually_exclusive_group()
    live.add_argument("--live", dest="live", action="store_true", default=None, help="one live status line")
    live.add_argument("--plain", dest="live", action="store_false", help="plain progress lines")

    image = sub.add_parser("image", help="system images: build the default one, prepare your own")
    isub = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build (or find in the cache) the tiny Python guest")
    b.add_argument("--cache-dir", type=Path, help="where the build is cached")
    pr = isub.add_parser(
        "prepare", help="install the agent and its boot hook into a disk image, without booting"
    )
    pr.add_argument("disk", type=Path, help="the disk image (qcow2, VDI, VMDK, VHD or raw)")
    pr.add_argument("--partition", type=_count, help="the root filesystem's partition (default: the largest)")
    pr.add_argument(
        "--init", choices=("systemd", "sysv"), help="force the boot hook's kind (default: detected)"
    )
    pr.add_argument("--no-python-check", action="store_true", help="do not require python3 in the image")

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
    """The error's own message (no traceback); multi-line only when it carries a log tail."""
    return str(exc).strip() or type(exc).__name__


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
