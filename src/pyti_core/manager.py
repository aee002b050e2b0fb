"""One pyti run end to end: fetch, IO disk, boot a network-less guest, collect the records, roll back.

::

    import pyti_core

    result = pyti_core.run("attrs==23.2.0")            # the tiny Python guest, the "default" recipe
    result.ok                                          # every task passed
    result.report.records                              # one RawDataRecord per task, measured in the guest
    result.phases                                      # {"download": 4.1, "io-disk": 0.3, "boot": 3.2, ...}

The phases of a run, in order (their names are the keys of :attr:`RunResult.phases` and the first
argument of the progress callback):

``download``
    on the host, :func:`~pyti_core.packages.prepare_distribution` resolves the distribution and its
    dependencies for the guest's Python and platform (only :func:`run` does this; a TaskManager calls
    :func:`run_prepared` with a distribution it already has);
``io-disk``
    :func:`~pyti_core.tasks.stage_io_folder` lays out the wheels, sources, ``job.json``, the agent and a
    ``run.sh`` in a folder, and :func:`diskhandler.create_io_disk` turns it into a fresh raw disk image
    (MBR, one ext4 partition) that belongs to this run only;
``boot``
    a VM is defined with **no network interface at all**, the guest's system booted from its clean state
    and the IO disk attached; the phase ends when the guest prints ``PYTI-GUEST-READY`` (else
    :class:`~pyti_core.errors.GuestBootError`, with the serial log, after ``GuestSystem.boot_timeout``);
``tasks``
    the guest runs ``run.sh`` (the agent), which installs offline, runs each task with its own timeout,
    writes one record per task onto the IO disk and powers the guest off. If the job ``timeout`` runs
    out first the host stops the VM, and every task without a record is reported as ``timeout``;
``collect``
    the host reads ``results/`` back from the IO disk with :class:`diskhandler.DiskOperations` and
    validates every record (:mod:`pyti_core.rawdata`); a record that is not JSON, too large, breaks the
    schema or names a task the job does not have is rejected, and its task reported as an ``error``;
``rollback``
    the VM is undefined and the throwaway overlay of the system disk deleted, so no run ever sees
    another's leftovers.

**The clean state.** The tiny Python guest (:meth:`GuestSystem.default`) has its whole system in the
initramfs, which the kernel unpacks into RAM at every boot: nothing the package does can outlive the run.
A :class:`GuestSystem` may also name a ``system_disk`` (any format QEMU reads). Each run boots it through
its own qcow2 overlay (vmanager's overlay rollback), so the base image is never written, and the overlay
is deleted at the end of the run. The IO disk is attached as a second disk that is never rolled back.

The library never prints: ``progress(phase, message)`` is called as the run goes (the default does
nothing), and the CLI draws.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
from packaging.requirements import InvalidRequirement, Requirement

from pyti_core.channel import (
    MAX_SOCKET_PATH,
    ChannelConfig,
    ChannelEvent,
    ChannelStats,
    EventCallback,
    LiveChannel,
    TaskFinished,
    TaskStarted,
    TestReport,
)
from pyti_core.errors import (
    ConfigError,
    GuestBootError,
    GuestRunError,
    ImagePrepareError,
    PytiError,
    RawDataError,
)
from pyti_core.guest import protocol
from pyti_core.guest.bytecode import use_compiled_pip, use_compiled_pip_in_job
from pyti_core.guest.protocol import CHANNEL_PORT, READY_MARKER, RUN_EXIT_MARKER
from pyti_core.packages import (
    DEBIAN_12,
    Distribution,
    GuestTarget,
    bundled_pip_wheel,
    normalize_name,
    prepare_distribution,
)
from pyti_core.rawdata import MAX_RECORD_BYTES, Environment, RawDataRecord, Report, parse_record
from pyti_core.tasks import GuestLayout, Recipe, get_recipe, stage_io_folder

if TYPE_CHECKING:
    from vmanager import Connection, DiskFormat, VirtualMachine

_log = logging.getLogger(__name__)

__all__ = [
    "PHASES",
    "GuestSystem",
    "ProgressCallback",
    "RunMatrix",
    "RunResult",
    "hypervisor_uri",
    "run",
    "run_prepared",
]

#: The phases of a run, in order: the keys of :attr:`RunResult.phases`.
PHASES: Final = ("download", "io-disk", "boot", "tasks", "collect", "rollback")
#: ``progress(phase, message)``: called from the thread that runs the job; must not block for long.
ProgressCallback = Callable[[str, str], None]

#: The IO disk holds the staged files twice over plus this much room for results and test files.
_IO_DISK_SLACK: Final = 64 << 20
_IO_DISK_MIN: Final = 96 << 20
#: The serial log kept in a result (and read while waiting) is at most this many bytes, its tail.
_SERIAL_KEEP: Final = 1 << 20
_POLL: Final = 0.1
#: Lines after these many oversize bytes are skipped, not read into memory.
_MAX_RECORDS_FILE: Final = 256 << 20
_RECORDS: Final = "records.jsonl"


#: The live channel is on by default, with these settings.
_DEFAULT_CHANNEL: Final = ChannelConfig()


def _no_progress(phase: str, message: str) -> None:
    """The default progress callback: does nothing."""


def _satisfied(requirement: str, installed: Mapping[str, str]) -> bool:
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return False
    version = installed.get(normalize_name(req.name))
    if version is None or req.extras or req.marker is not None or req.url:
        return False
    return not req.specifier or req.specifier.contains(version, prereleases=True)


@attrs.frozen
class RunResult:
    """What one run brought home.

    ``report`` holds one record per task of the job (tasks skipped because an install failed before
    them have none). ``phases`` maps each phase that ran (see :data:`PHASES`) to its wall time in
    seconds. ``serial_log`` is the guest's console output (its last MiB). ``timed_out`` says the host
    had to stop the VM at the job timeout, ``stalled`` that it stopped it because the guest stopped
    responding on the live channel. ``channel`` tells what went over the live channel (``None`` when
    it was off). ``work_dir`` is where the run's files were kept (``keep=True``), else ``None``.
    ``guest`` is the name of the guest system it ran on (``"3.11"``, ``"pypy3"``; empty for an unnamed
    one); ``environment`` is where it ran, as measured in the guest. In Jupyter it renders as the table
    ``pyti run`` prints.
    """

    distribution: str
    report: Report
    phases: Mapping[str, float]
    serial_log: str
    timed_out: bool = False
    work_dir: Path | None = None
    stalled: bool = False
    channel: ChannelStats | None = None
    guest: str = ""

    @property
    def ok(self) -> bool:
        """True when the job has records and every one of them passed."""
        return bool(self.report.records) and self.report.ok

    @property
    def environment(self) -> Environment | None:
        return self.report.environment

    def __str__(self) -> str:
        from pyti_core.tables import format_table  # noqa: PLC0415 (tables imports this module)

        return format_table(self)

    def _repr_html_(self) -> str:
        from pyti_core.tables import run_table  # noqa: PLC0415

        return run_table(self).html()


def _results(value: Iterable[RunResult]) -> tuple[RunResult, ...]:
    return tuple(value)


@attrs.frozen
class RunMatrix:
    """The runs of one ``pyti run`` across several environments (and distributions), in order.

    Iterate it for the :class:`RunResult` objects; ``ok`` is true when every run passed. ``str()`` and
    Jupyter show the table ``pyti run`` prints: a row per task, a column per environment.
    """

    results: tuple[RunResult, ...] = attrs.field(converter=_results)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, index: int) -> RunResult:
        return self.results[index]

    def __str__(self) -> str:
        from pyti_core.tables import matrix_table  # noqa: PLC0415

        return matrix_table(self.results).text()

    def _repr_html_(self) -> str:
        from pyti_core.tables import matrix_table  # noqa: PLC0415

        return matrix_table(self.results).html()


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(None, f"guest.{attribute.name}", f"must be > 0, got {value!r}")


def _opt_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@attrs.frozen
class GuestSystem:
    """The system a run boots: a kernel and initramfs (direct boot) and/or a system disk.

    * ``kernel``, ``initrd``, ``cmdline``: direct kernel boot. The initramfs must behave like pyti's tiny
      guest (``docs/guest-image.md``): mount the IO disk named by ``pyti.disk=`` at ``layout.io_dir``,
      print ``PYTI-GUEST-READY``, run the script named by ``pyti.run=``, then power off.
    * ``system_disk``: a disk image (any format QEMU reads) booted as the first disk through a throwaway
      qcow2 overlay per run; the base is never written. With a kernel it is mounted by ``run.sh`` at
      ``system_mount``; without a kernel it must boot by itself, with pyti's agent hook installed
      (``pyti image prepare``), which prints the ready marker, runs ``run.sh`` from the IO disk and
      powers off.
    * ``memory`` (MiB), ``vcpus``, ``accel`` (``"auto"``, ``"kvm"``, ``"tcg"``): the VM's hardware.
    * ``boot_timeout``: seconds from the VM's start to the ready marker.
    * ``layout``: paths in the guest; ``target``: the guest's Python and platform, for the download.
    * ``name``: what tables and report file names call it (``"3.11"``, ``"pypy3"``).
    * ``preinstalled``: Python distributions already installed in the guest (name -> version); the
      recipe's requirements among them are neither downloaded nor installed (:meth:`recipe_for`).
    """

    kernel: Path | None = attrs.field(default=None, converter=_opt_path)
    initrd: Path | None = attrs.field(default=None, converter=_opt_path)
    cmdline: str = "console=ttyS0 panic=-1 quiet no_timer_check"
    system_disk: Path | None = attrs.field(default=None, converter=_opt_path)
    system_mount: str = "/mnt/system"
    memory: int = 512
    vcpus: int = 1
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout: float = attrs.field(default=90.0, validator=_positive)
    layout: GuestLayout = attrs.field(factory=GuestLayout)
    target: GuestTarget = DEBIAN_12
    name: str = ""
    preinstalled: Mapping[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.kernel is None and self.system_disk is None:
            raise ConfigError(None, "guest", "a guest system needs a kernel (and initrd) or a system disk")
        if self.kernel is None and self.initrd is not None:
            raise ConfigError(None, "guest.initrd", "an initrd needs a kernel")
        if self.memory < 64 or self.vcpus < 1:
            raise ConfigError(None, "guest", f"memory must be >= 64 MiB and vcpus >= 1, got {self}")

    @classmethod
    def default(cls, cache_dir: Path | None = None) -> GuestSystem:
        """The tiny Python guest (Debian's kernel, busybox and Python 3.11 in an initramfs).

        Built from Debian packages on first use and cached under ``cache_dir`` (default: the user cache,
        see :func:`pyti_core.guest.tinylinux.default_cache_dir`); ``pyti image build`` does the same.
        Raises :class:`~pyti_core.errors.GuestImageError` when it cannot be built.
        """
        return cls.for_python(None, cache_dir)

    @classmethod
    def for_python(
        cls, python: str | None, cache_dir: Path | None = None, *, refresh: bool = False
    ) -> GuestSystem:
        """The tiny guest with ``python`` (``"3.9"``, ``"3.11"``, ``"3.13"``, ``"3.14"``, ``"pypy3"``: see
        :data:`pyti_core.guest.tinylinux.INTERPRETERS`), built from the Debian suite that ships it.

        ``None`` is the default guest (Python 3.11, unnamed). Its wheels are resolved for its Python
        (``target``); pip and the test tooling are preinstalled (``preinstalled``). Raises
        ``ValueError`` for an unknown name and :class:`~pyti_core.errors.GuestImageError` when the guest
        cannot be built (a suite that cannot be reached is named; a cached build is used when there is one).
        """
        from pyti_core.guest import tinylinux  # noqa: PLC0415 (apt only when used)

        interpreter = tinylinux.interpreter_named(python or tinylinux.DEFAULT_PYTHON)
        tiny = tinylinux.build_tiny_linux(cache_dir, python=interpreter.name, refresh=refresh)
        return cls(
            kernel=tiny.kernel,
            initrd=tiny.initrd,
            cmdline=tiny.cmdline,
            target=tinylinux.guest_target(interpreter, tiny.packages),
            name=python or "",
            preinstalled=tiny.preinstalled,
            layout=GuestLayout(pip_installed="pip" in tiny.preinstalled),
        )

    def recipe_for(self, recipe: Recipe) -> Recipe:
        """``recipe`` without the requirements this guest already has installed (its test tooling).

        A requirement is left out only when it names a preinstalled distribution without extras or
        markers, and the installed version satisfies its specifier; anything else is installed.
        """
        missing = tuple(r for r in recipe.requirements if not _satisfied(r, self.preinstalled))
        return recipe if missing == recipe.requirements else attrs.evolve(recipe, requirements=missing)

    @classmethod
    def from_image(cls, image: str | os.PathLike[str], *, boot_timeout: float = 300.0) -> GuestSystem:
        """A system disk that boots by itself through the BIOS: one ``pyti image build --os`` made, or
        any image ``pyti image prepare`` has put pyti's agent and boot hook into.

        The image is read (never written, never booted) first: without pyti's hook it would boot and
        never run the job, so :class:`~pyti_core.errors.ImagePrepareError` says to run
        ``pyti image prepare IMAGE``; without ``python3`` it is refused too. The wheels of a run are
        chosen for the Python and glibc found in it. ``boot_timeout`` is generous: a whole system
        with systemd boots in 30 s to minutes under TCG, depending on the host's load.
        """
        from pyti_core.image import inspect_image  # noqa: PLC0415 (diskhandler's FUSE view)

        path = Path(image)
        info = inspect_image(path)
        if not info.prepared:
            raise ImagePrepareError(
                path,
                "pyti's agent and boot hook are not installed, so the guest would boot but never run "
                f"the job: run `pyti image prepare {path}` first (found init: {info.init or 'none'})",
            )
        if info.python_version is None:
            raise ImagePrepareError(path, "no python3 in the guest: the agent needs Python 3.8 or newer")
        target = GuestTarget(python_version=info.python_version, glibc=info.glibc or DEBIAN_12.glibc)
        return cls(system_disk=path, boot_timeout=boot_timeout, target=target)

    @property
    def io_device(self) -> str:
        """The IO disk's block device in the guest: the first disk, or the second after a system disk."""
        return "/dev/vdb" if self.system_disk is not None else "/dev/vda"

    def run_cmdline(self) -> str:
        """The kernel command line of a run: mount the IO disk's partition, run ``run.sh`` from it."""
        dev = self.io_device
        return protocol.kernel_cmdline(
            self.cmdline, disks=(f"{dev}1", dev), run=self.layout.path(protocol.RUN_SCRIPT)
        )


def run_script(guest: GuestSystem) -> str:
    """The ``run.sh`` put on the IO disk (:func:`pyti_core.guest.protocol.run_script` for this guest)."""
    layout = guest.layout
    mount = None
    if guest.system_disk is not None and guest.kernel is not None:
        mount = ("/dev/vda", guest.system_mount)
    return protocol.run_script(
        python=layout.python, io_dir=layout.io_dir, work_dir=layout.path(layout.work), system_mount=mount
    )


# -- the run ---------------------------------------------------------------------------------------------


def run(
    spec: str | os.PathLike[str],
    *,
    recipe: str | Recipe = "default",
    timeout: float = 600.0,
    work_dir: Path | None = None,
    uri: str | None = None,
    guest: GuestSystem | None = None,
    progress: ProgressCallback | None = None,
    cache_dir: Path | None = None,
    keep: bool = False,
    find_links: Sequence[Path] = (),
    no_index: bool = False,
    index_url: str | None = None,
    channel: ChannelConfig | None = _DEFAULT_CHANNEL,
    on_event: EventCallback | None = None,
) -> RunResult:
    """Test ``spec`` in a fresh network-less VM and return what came back.

    ``spec`` is a requirement (``"attrs==23.2.0"``) or the path of an sdist, a wheel or a project folder.
    ``recipe`` is a built-in recipe name or a :class:`~pyti_core.tasks.Recipe`. ``timeout`` bounds the
    guest's whole run (boot and tasks) in seconds: when it runs out the VM is stopped and the tasks
    without a record are reported as ``timeout``. ``guest`` defaults to :meth:`GuestSystem.default`;
    ``uri`` is the hypervisor (default: libvirt's QEMU driver embedded in this process).

    ``cache_dir`` is pyti's cache: the guest build goes in ``cache_dir/guest``, pip's cache in
    ``cache_dir/pip`` (default: the user cache). The run's files go in a fresh folder inside
    ``work_dir`` (default: the system's temporary folder), deleted at the end unless ``keep``.
    ``find_links``, ``no_index`` and ``index_url`` are passed to pip for the download.

    ``channel`` configures the live channel (a virtio-serial port; ``None`` turns it off): while the
    guest runs, every task start and end and every test's outcome reach ``progress`` (phase
    ``"tasks"``) and, as typed :class:`~pyti_core.channel.ChannelEvent` objects, ``on_event``; a guest
    that stops sending heartbeats for ``channel.stall_timeout`` seconds is stopped and its unfinished
    tasks reported as errors, long before the job timeout. The records on the IO disk stay the results:
    the channel only tells, and a dead, silent or hostile channel changes nothing in them.

    Raises :class:`~pyti_core.errors.PackageError` when the download fails,
    :class:`~pyti_core.errors.GuestBootError` when the guest does not boot, and
    :class:`~pyti_core.errors.GuestRunError` when the VM or the IO disk fails otherwise.
    """
    report_progress = progress or _no_progress
    the_recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not timeout > 0:
        raise ConfigError(None, "timeout", f"the job timeout must be > 0 seconds, got {timeout!r}")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="pyti-run-", dir=work_dir))
    try:
        if guest is None:
            report_progress("download", "building or reusing the tiny Python guest")
            guest = GuestSystem.default(cache_dir / "guest" if cache_dir is not None else None)
        the_recipe = guest.recipe_for(the_recipe)
        started = time.monotonic()
        report_progress("download", f"resolving {os.fspath(spec)} for the guest")
        distribution = prepare_distribution(
            spec if isinstance(spec, str) else Path(spec),
            folder / "dist",
            requirements=the_recipe.requirements,
            target=guest.target,
            cache_dir=cache_dir / "pip" if cache_dir is not None else None,
            index_url=index_url,
            no_index=no_index,
            find_links=find_links,
            pip_wheel=bundled_pip_wheel(),
        )
        download = time.monotonic() - started
        report_progress("download", f"{len(distribution.wheels)} wheels for {distribution.requirement}")
        result = run_prepared(
            distribution,
            the_recipe,
            guest=guest,
            timeout=timeout,
            work_dir=folder / "run",
            uri=uri,
            progress=report_progress,
            channel=channel,
            on_event=on_event,
        )
    except BaseException:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return attrs.evolve(
        result, phases={"download": download, **result.phases}, work_dir=folder if keep else None
    )


def run_prepared(
    distribution: Distribution,
    recipe: Recipe,
    *,
    guest: GuestSystem,
    timeout: float,
    work_dir: Path,
    uri: str | None = None,
    connection: Connection | None = None,
    progress: ProgressCallback | None = None,
    name: str | None = None,
    channel: ChannelConfig | None = _DEFAULT_CHANNEL,
    on_event: EventCallback | None = None,
) -> RunResult:
    """Run ``recipe`` on an already downloaded ``distribution`` in one fresh VM; safe from any thread.

    ``work_dir`` receives the IO disk (``io.img``), the serial log (``serial.log``) and the results read
    back (``results/``); the caller owns it and deletes it. The VM runs on ``connection`` (an open
    :class:`vmanager.Connection`, shared with other runs and left open) or else on a connection to
    ``uri`` opened and closed by the run (default: :func:`hypervisor_uri`); not both. ``name`` is the
    VM's name (default: a unique ``pyti-<project>-<random>``); two runs at the same time need different
    names. ``channel`` and ``on_event``: the live channel, as in :func:`run`; its socket is
    ``work_dir/rpc.sock`` (or a short temporary folder when that path is too long for a unix socket).
    Phases and errors as in :func:`run` (without the download).
    """
    report_progress = progress or _no_progress
    if not timeout > 0:
        raise ConfigError(None, "timeout", f"the job timeout must be > 0 seconds, got {timeout!r}")
    if uri is not None and connection is not None:
        raise ConfigError(None, "uri", "give a hypervisor uri or an open connection, not both")
    name = name or _vm_name(distribution.name)
    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}

    # -- io-disk ------------------------------------------------------------------------------------
    t0 = time.monotonic()
    report_progress("io-disk", "staging the wheels, sources and job")
    heartbeat = channel.heartbeat if channel is not None else None
    job = stage_io_folder(work_dir / "io", distribution, recipe, guest.layout, heartbeat=heartbeat)
    if not guest.layout.pip_installed and use_compiled_pip(guest.target):
        job = use_compiled_pip_in_job(job, work_dir / "io", distribution.pip_wheel, guest.layout)
    (work_dir / "io" / protocol.RUN_SCRIPT).write_text(run_script(guest))
    # Made here, so its directory entry is on the disk before the guest runs: the agent only appends
    # and fsyncs it, which keeps every finished record even when the VM is stopped at the job timeout.
    (work_dir / "io" / guest.layout.results / _RECORDS).touch()
    io_disk = work_dir / "io.img"
    io_disk.unlink(missing_ok=True)
    size = _io_disk_size(work_dir / "io")
    report_progress("io-disk", f"writing a {size >> 20} MiB IO disk")
    try:
        _create_io_disk(io_disk, size, work_dir / "io")
    finally:
        shutil.rmtree(work_dir / "io", ignore_errors=True)
    phases["io-disk"] = time.monotonic() - t0

    # -- boot, tasks, collect, rollback ---------------------------------------------------------------
    serial_path = work_dir / "serial.log"
    serial_path.unlink(missing_ok=True)
    socket_dir = _socket_dir(work_dir) if channel is not None else None
    live: LiveChannel | None = None
    if channel is not None and socket_dir is not None:
        socket_path = socket_dir / "rpc.sock"
        socket_path.unlink(missing_ok=True)
        names = {str(t["id"]): str(t["name"]) for t in job["tasks"]}
        live = LiveChannel(
            socket_path,
            channel,
            on_event=_event_relay(names, report_progress, on_event),
            connect_timeout=min(guest.boot_timeout, timeout) + 30,
        )
    try:
        vm = _define_vm(
            guest, name, connection if connection is not None else uri, io_disk, serial_path,
            live.path if live is not None else None,
        )  # fmt: skip
    except BaseException:
        _remove_socket_dir(socket_dir, work_dir)
        raise
    accelerator = _accelerator(vm)
    try:
        outcome = _boot_and_wait(vm, guest, serial_path, timeout, phases, report_progress, live)
        t0 = time.monotonic()
        report_progress("collect", "reading the records back from the IO disk")
        serial = _read_tail(serial_path)
        results = work_dir / "results"
        shutil.rmtree(results, ignore_errors=True)
        try:
            _download_results(io_disk, guest.layout, results)
        except (OSError, PytiError) as exc:
            raise GuestRunError(
                f"{io_disk}: cannot read the results back from the IO disk: {exc}", vm=name, serial_log=serial
            ) from exc
        records = _collect_records(
            results / _RECORDS, job["tasks"], timed_out=outcome.timed_out, exited=outcome.exit_marker,
            job_timeout=timeout, serial=serial, ready_at=outcome.ready_at, stopped_at=outcome.stopped_at,
            stalled=outcome.stalled,
        )  # fmt: skip
        phases["collect"] = time.monotonic() - t0
        verdict = "passed" if records and all(r.ok for r in records) else "failed"
        report_progress("collect", f"{len(records)} records: {verdict}")
    finally:
        t0 = time.monotonic()
        report_progress("rollback", f"discarding VM {name} and its overlay")
        if live is not None:
            live.close()
        _discard_vm(vm, work_dir)
        _remove_socket_dir(socket_dir, work_dir)
        phases["rollback"] = time.monotonic() - t0
    records = _explain_missing_compiler(records, distribution)
    environment, records = _with_environment(records, accelerator)
    report = Report(distribution.requirement, tuple(records), environment)
    return RunResult(
        distribution=distribution.requirement,
        report=report,
        phases={p: phases[p] for p in PHASES if p in phases},
        serial_log=serial,
        timed_out=outcome.timed_out,
        stalled=outcome.stalled is not None,
        channel=live.stats if live is not None else None,
        guest=guest.name,
    )


def _socket_dir(work_dir: Path) -> Path:
    """The live channel's socket folder: the run's, or a short temporary one when that is too deep."""
    if len(os.fsencode(work_dir / "rpc.sock")) <= MAX_SOCKET_PATH:
        return work_dir
    return Path(tempfile.mkdtemp(prefix="pyti-ch-"))


def _remove_socket_dir(socket_dir: Path | None, work_dir: Path) -> None:
    if socket_dir is None:
        return
    with contextlib.suppress(OSError):
        (socket_dir / "rpc.sock").unlink(missing_ok=True)
    if socket_dir != work_dir:
        shutil.rmtree(socket_dir, ignore_errors=True)


def _event_relay(
    names: Mapping[str, str], progress: ProgressCallback, on_event: EventCallback | None
) -> EventCallback:
    """The channel's callback: tasks and test outcomes to ``progress``, every event to ``on_event``."""

    def relay(event: ChannelEvent) -> None:
        if isinstance(event, TestReport):
            task = names.get(event.task_id, event.task_id)
            progress("tasks", f"{task}: {event.word or event.outcome.upper()} {event.nodeid}")
        elif isinstance(event, TaskStarted):
            progress("tasks", f"{names.get(event.task_id, event.task)}: started")
        elif isinstance(event, TaskFinished):
            task = names.get(event.task_id, event.task)
            progress("tasks", f"{task}: {event.status} after {event.duration_s:.1f} s")
        if on_event is not None:
            on_event(event)

    return relay


_NO_COMPILER: Final = re.compile(
    r"command '[\w./-]*(?:gcc|cc|g\+\+|clang)' failed|unable to execute '[\w./-]*(?:gcc|cc)'|"
    r"(?:gcc|cc|c\+\+|g\+\+): (?:command )?not found|No such file or directory: '[\w./-]*(?:gcc|cc)'|"
    r"[Cc]ould not find (?:a )?C compiler|Unknown compiler|no acceptable C compiler"
)


def _explain_missing_compiler(
    records: list[RawDataRecord], distribution: Distribution
) -> list[RawDataRecord]:
    """An install that failed building an sdist for lack of a C compiler says so on its first line."""
    sdists = [p.name for p in distribution.wheels if not p.name.endswith(".whl")]
    note = (
        f"[pyti: {', '.join(sdists)} has no wheel for this guest's Python, so pip built it from its sdist "
        "in the guest, and that needs a C compiler, which the tiny guest does not have; use a version "
        "that publishes wheels for this Python, or test it on a system disk with build tools "
        "(pyti run --guest)]\n"
    )

    def explained(record: RawDataRecord) -> RawDataRecord:
        failed_build = (
            sdists
            and record.task.startswith("install")
            and record.status == "failed"
            and (_NO_COMPILER.search(record.stderr) or _NO_COMPILER.search(record.stdout))
        )
        return attrs.evolve(record, stderr=note + record.stderr) if failed_build else record

    return [explained(r) for r in records]


def _accelerator(vm: VirtualMachine) -> str:
    """``"kvm"`` or ``"tcg"`` from the domain's type (libvirt's ``qemu`` type is TCG); else the type."""
    from vmanager import VManagerError  # noqa: PLC0415

    try:
        root = ET.fromstring(vm.xml_desc())
    except (VManagerError, ET.ParseError):
        return ""
    kind = root.get("type", "")
    return {"qemu": "tcg", "kvm": "kvm"}.get(kind, kind)


def _with_environment(
    records: Sequence[RawDataRecord], accelerator: str
) -> tuple[Environment | None, list[RawDataRecord]]:
    """The run's environment (the first record's, as measured in the guest, plus the host's
    ``accelerator``) and the records, each carrying it; records the host made up get it too."""
    measured = next((r.environment for r in records if r.environment is not None), None)
    if measured is None:
        return None, list(records)
    environment = attrs.evolve(measured, accelerator=accelerator)
    return environment, [
        attrs.evolve(r, environment=attrs.evolve(r.environment or environment, accelerator=accelerator))
        for r in records
    ]


def hypervisor_uri(uri: str | None = None) -> str:
    """The hypervisor URI a run uses: ``uri`` itself, else :func:`vmanager.default_uri`.

    That is libvirt's QEMU driver embedded in this process (``qemu:///embed``); vmanager gives the
    process a private root when another process holds the default one (libvirt would make it wait).
    """
    if uri is not None:
        return uri
    from vmanager import default_uri  # noqa: PLC0415

    return default_uri()


def _vm_name(project: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9.+-]+", "-", project).strip("-.")[:40] or "dist"
    return f"pyti-{stem}-{uuid.uuid4().hex[:10]}"


def _io_disk_size(folder: Path) -> int:
    total = 0
    count = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        count += len(dirnames) + len(filenames)
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_size
    # every file and folder takes at least a 4 KiB block and an inode
    size = 2 * (total + 8192 * count) + _IO_DISK_SLACK
    return max(_IO_DISK_MIN, -(-size // (1 << 20)) << 20)


def _create_io_disk(path: Path, size: int, folder: Path) -> None:
    from diskhandler import create_io_disk  # noqa: PLC0415 (diskhandler loads FUSE bindings)
    from diskhandler.errors import DiskHandlerError  # noqa: PLC0415

    try:
        create_io_disk(path, size, format="raw", filesystem="ext2", files=folder, label=protocol.IO_LABEL)
    except (DiskHandlerError, OSError, ValueError) as exc:
        raise GuestRunError(f"{path}: cannot create the IO disk: {exc}") from exc


@attrs.frozen
class _Outcome:
    timed_out: bool
    exit_marker: bool
    ready_at: datetime.datetime | None = None  # UTC, when the ready marker was seen
    stopped_at: datetime.datetime | None = None  # UTC, when the host stopped the VM (timeout or stall)
    stalled: float | None = (
        None  # the silence (s) after which the host stopped a guest that stopped responding
    )


def _define_vm(  # noqa: PLR0917 (private helper)
    guest: GuestSystem,
    name: str,
    uri: str | Connection | None,
    io_disk: Path,
    serial_path: Path,
    channel_socket: Path | None = None,
) -> VirtualMachine:
    """Define the run's VM: the guest system (its disk through an overlay), the IO disk, no network,
    and the live channel's virtio-serial port when ``channel_socket`` is given."""
    try:
        from vmanager import Channel, Disk, VirtualMachine, VManagerError, VMConfig  # noqa: PLC0415
    except ImportError as exc:  # libvirt-python is missing: everything but running a VM works without it
        raise GuestRunError(
            f"cannot run VM {name}: vmanager cannot load libvirt-python ({exc}); install it "
            "(pip install libvirt-python, which needs libvirt's development files)",
            vm=name,
        ) from exc

    config = VMConfig(
        name=name,
        memory=guest.memory,
        vcpus=guest.vcpus,
        hd_location=guest.system_disk,
        hd_format=_system_disk_format(guest.system_disk),
        disks=(Disk(io_disk, snapshot=False, format="raw"),),
        kernel=guest.kernel,
        initrd=guest.initrd,
        cmdline=guest.run_cmdline() if guest.kernel is not None else None,
        serial_log=serial_path,
        network=None,
        channels=(Channel(CHANNEL_PORT, channel_socket),) if channel_socket is not None else (),
        rollback="overlay" if guest.system_disk is not None else "snapshot",
        overlay_dir=io_disk.parent / "overlay" if guest.system_disk is not None else None,
        accel=guest.accel,
    )
    try:
        target = hypervisor_uri(uri) if uri is None or isinstance(uri, str) else uri
        return VirtualMachine(name, target, config)
    except VManagerError as exc:
        raise GuestRunError(f"cannot define VM {name}: {exc}", vm=name) from exc


def _system_disk_format(path: Path | None) -> DiskFormat | None:
    """The system disk's format, stated to vmanager (which does not guess a format that names other
    files, such as a qcow2 over a base image). The system disk is the user's own image, read as
    diskhandler reads it, and no guest ever writes it: runs write to a throwaway overlay."""
    if path is None:
        return None
    from diskhandler import DiskHandlerError, detect_format  # noqa: PLC0415

    try:
        fmt = detect_format(path)
    except (DiskHandlerError, OSError):
        return None  # vmanager reports a missing or unreadable disk, by its field
    known: dict[str, DiskFormat] = {
        "qcow2": "qcow2",
        "vdi": "vdi",
        "vmdk": "vmdk",
        "vhd": "vpc",
        "raw": "raw",
    }
    return known.get(fmt)


def _discard_vm(vm: VirtualMachine, work_dir: Path) -> None:
    """Stop and undefine the VM; its overlay goes with it (the system disk is back to its base)."""
    from vmanager import VManagerError  # noqa: PLC0415

    try:
        with contextlib.suppress(VManagerError):
            vm.stop()
        with contextlib.suppress(VManagerError):
            vm.undefine()  # deletes the system disk's overlay
    finally:
        vm.close()
        shutil.rmtree(work_dir / "overlay", ignore_errors=True)


def _boot_and_wait(  # noqa: PLR0917 (private helper called once)
    vm: VirtualMachine,
    guest: GuestSystem,
    serial_path: Path,
    timeout: float,
    phases: dict[str, float],
    progress: ProgressCallback,
    live: LiveChannel | None = None,
) -> _Outcome:
    """Boot the VM, wait for the ready marker, then for power-off, the job timeout or a stall."""
    from vmanager import RunState, VManagerError  # noqa: PLC0415

    name = vm.name
    stopped = (RunState.SHUTOFF, RunState.CRASHED)
    t0 = time.monotonic()
    progress("boot", f"starting VM {name}")
    timed_out = False
    stalled: float | None = None
    stopped_at: datetime.datetime | None = None
    try:
        try:
            vm.start()
        except VManagerError as exc:
            raise GuestRunError(
                f"cannot start VM {name}: {exc}", vm=name, serial_log=_read_tail(serial_path)
            ) from exc
        if live is not None:
            live.start()  # QEMU listens on the socket from its start
        started = time.monotonic()
        boot_deadline = started + min(guest.boot_timeout, timeout)
        job_deadline = started + timeout
        # boot: until the ready marker
        while READY_MARKER not in _read_tail(serial_path):
            state = vm.state
            now = time.monotonic()
            if state in stopped or now >= boot_deadline:
                why = (
                    f"the VM stopped ({state.name}) before the guest was ready"
                    if state in stopped
                    else f"no {READY_MARKER} on the serial console within {now - started:.0f} s"
                )
                raise GuestBootError(
                    f"VM {name}: {why}",
                    vm=name,
                    serial_log=_read_tail(serial_path),
                    timeout=guest.boot_timeout,
                )
            time.sleep(_POLL)
        phases["boot"] = time.monotonic() - t0
        ready_at = datetime.datetime.now(datetime.UTC)
        progress("boot", f"guest ready after {phases['boot']:.1f} s")
        # tasks: until the guest powers off, or the job timeout
        t1 = time.monotonic()
        progress("tasks", "running the tasks in the guest")
        while vm.state not in stopped:
            if time.monotonic() >= job_deadline:
                timed_out = True
                stopped_at = datetime.datetime.now(datetime.UTC)
                progress("tasks", f"job timeout ({timeout:g} s): stopping the VM")
                vm.stop()
                break
            if live is not None and live.stalled:
                stalled = live.silence or live.config.stall_timeout
                stopped_at = datetime.datetime.now(datetime.UTC)
                progress(
                    "tasks", f"the guest stopped responding (silent for {stalled:.0f} s): stopping the VM"
                )
                vm.stop()
                break
            time.sleep(_POLL)
        phases["tasks"] = time.monotonic() - t1
    except VManagerError as exc:
        raise GuestRunError(f"VM {name} failed: {exc}", vm=name, serial_log=_read_tail(serial_path)) from exc
    return _Outcome(
        timed_out=timed_out,
        exit_marker=RUN_EXIT_MARKER in _read_tail(serial_path),
        ready_at=ready_at,
        stopped_at=stopped_at,
        stalled=stalled,
    )


def _read_tail(path: Path, limit: int = _SERIAL_KEEP) -> str:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                fh.seek(size - limit)
            data = fh.read(limit)
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", "replace")


def _download_results(io_disk: Path, layout: GuestLayout, dest: Path) -> None:
    from diskhandler import DiskOperations, GuestLinkWarning  # noqa: PLC0415

    # raw and self-contained, whatever its first bytes say: the guest owns them, and could write a qcow2
    # header there naming a host file as its backing file (qemu's old format-probing hole)
    with DiskOperations(io_disk, readonly=True, format="raw", parents="none") as ops:
        guest_results = "/" + layout.results
        if ops.exists(guest_results):
            # Links and special files the guest left are skipped by the download: the guest's doing,
            # logged, not the caller's warning to handle (their records are then simply missing).
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", GuestLinkWarning)
                # the files cannot legitimately hold more than the disk: a sparse file claiming
                # terabytes must not fill the host's disk with zeros
                ops.download(guest_results, dest, max_bytes=io_disk.stat().st_size)
            for warning in caught:
                if issubclass(warning.category, GuestLinkWarning):
                    _log.warning("%s", warning.message)
                else:
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
        else:
            dest.mkdir(parents=True)


def _read_lines(path: Path) -> Iterable[tuple[int, bytes | None]]:
    """``(line number, line)`` of a records file; ``None`` for a line longer than one record may be.

    Nothing when the file is missing or is not a regular file (the guest may have replaced it).
    """
    if not path.is_file() or path.is_symlink():
        return
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below, generator)
    except OSError:
        return
    with fh:
        read = 0
        number = 0
        while read < _MAX_RECORDS_FILE:
            line = fh.readline(MAX_RECORD_BYTES + 2)
            if not line:
                return
            read += len(line)
            if len(line) > MAX_RECORD_BYTES + 1 or (len(line) == MAX_RECORD_BYTES + 1 and line[-1:] != b"\n"):
                while line and line[-1:] != b"\n":  # skip the rest of the oversized line
                    line = fh.readline(1 << 20)
                    read += len(line)
                yield number, None
            else:
                yield number, line
            number += 1


def _collect_records(
    path: Path,
    tasks: Sequence[Mapping[str, Any]],
    *,
    timed_out: bool,
    exited: bool,
    job_timeout: float,
    serial: str,
    ready_at: datetime.datetime | None = None,
    stopped_at: datetime.datetime | None = None,
    stalled: float | None = None,
) -> list[RawDataRecord]:
    """The job's records from the guest's ``records.jsonl``, validated; missing ones made up honestly.

    A line that is not a valid record, or names a task the job lacks (or one already reported), is
    rejected: its task (when it can be told) is reported as ``error`` with the reason. A task without a
    record is reported as ``timeout`` when the host stopped the VM at the job timeout, else as ``error``
    (the guest stopped before reporting it). Tasks after a task that stops the job on failure legitimately
    have no record and none is made up. The task that was running at the job timeout gets, as its start
    and duration, the end of the task before it (or ``ready_at``) and the time until ``stopped_at``, as
    far as the host can tell; its memory and CPU figures are unknown (0). When the host stopped a guest
    that had been silent on the live channel for ``stalled`` seconds, the tasks without a record are
    ``error``: the guest stopped responding, with the serial console's tail.
    """
    by_id = {str(t["id"]): t for t in tasks}
    got: dict[str, RawDataRecord] = {}
    rejected: dict[str, str] = {}
    unattributed = _Rejections()
    for number, line in _read_lines(path):
        if line is None:
            unattributed.add(f"line {number + 1}: longer than the {MAX_RECORD_BYTES}-byte record limit")
            continue
        if not line.strip():
            continue
        try:
            record = parse_record(line, record=number)
        except RawDataError as exc:
            task_id = _claimed_task_id(line)
            if task_id in by_id and task_id not in got:
                rejected.setdefault(task_id, str(exc))
            else:
                unattributed.add(f"line {number + 1}: {exc}")
            continue
        if record.task_id not in by_id:
            unattributed.add(f"line {number + 1}: task id {record.task_id!r} is not in the job")
        elif record.task_id in got:
            unattributed.add(f"line {number + 1}: a second record for task {record.task_id!r}")
        elif record.task != by_id[record.task_id].get("name"):
            rejected[record.task_id] = (
                f"record {number}: task {record.task_id!r} is named {by_id[record.task_id].get('name')!r} "
                f"in the job, not {record.task!r}"
            )
        else:
            got[record.task_id] = record  # a valid record stands, even after a rejected line claiming it
    now = datetime.datetime.now(datetime.UTC)
    out: list[RawDataRecord] = []
    first_missing = True
    previous_end = ready_at
    extra = unattributed.summary()
    for task in tasks:
        task_id = str(task["id"])
        task_name = str(task.get("name", task_id))
        if task_id in got:
            record = got[task_id]
            out.append(record)
            previous_end = record.started_at + datetime.timedelta(seconds=record.duration_s)
            if not record.ok and task.get("stop_on_failure"):
                break
            continue
        started, duration = now, 0.0
        if task_id in rejected:
            status, why = "error", f"[pyti: the guest's record was rejected: {rejected[task_id]}]"
        elif stalled is not None:
            if first_missing and previous_end is not None and stopped_at is not None:
                started = min(previous_end, stopped_at)
                duration = (stopped_at - started).total_seconds()
            status = "error"
            tail = "\n".join(serial.rstrip().splitlines()[-20:])
            doing = "while this task ran" if first_missing else "before this task started"
            why = (
                f"[pyti: the guest stopped responding {doing}: no heartbeat on the live channel for "
                f"{stalled:.0f} s; the VM was stopped]\n--- serial console (last lines) ---\n{tail}"
            )
            first_missing = False
        elif timed_out:
            if first_missing and previous_end is not None and stopped_at is not None:
                started = min(previous_end, stopped_at)
                duration = (stopped_at - started).total_seconds()
            status = "timeout"
            why = (
                f"[pyti: the job's {job_timeout:g} s timeout ran out while this task ran; the VM was stopped]"
                if first_missing
                else f"[pyti: the job's {job_timeout:g} s timeout ran out before this task started]"
            )
            first_missing = False
        else:
            status = "error"
            ended = "after the agent ended" if exited else "without the agent's end marker"
            tail = "\n".join(serial.rstrip().splitlines()[-20:])
            why = f"[pyti: the guest powered off {ended} and left no record of this task]\n{tail}"
        out.append(
            RawDataRecord(
                task_id=task_id,
                task=task_name,
                status=status,  # type: ignore[arg-type]  # one of the Status literals above
                exit_code=None,
                stdout="",
                stderr=why + extra,
                started_at=started,
                duration_s=round(duration, 6),
                max_rss_kb=0,
                cpu_user_s=0.0,
                cpu_system_s=0.0,
            )
        )
    return out


@attrs.define
class _Rejections:
    """Rejected lines no task can be blamed for: the first few kept for the message, the rest counted,
    so a flood of junk lines does not grow memory."""

    first: list[str] = attrs.field(factory=list)
    count: int = 0

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(reason)

    def summary(self) -> str:
        if not self.count:
            return ""
        more = f"; and {self.count - len(self.first)} more" if self.count > len(self.first) else ""
        return "; other rejected lines: " + "; ".join(self.first) + more


_TASK_ID: Final = re.compile(rb'"task_id"\s*:\s*"([^"\\]{1,64})"')


def _claimed_task_id(line: bytes) -> str | None:
    """The task id a rejected line seems to be about (best effort, for the error message only)."""
    match = _TASK_ID.search(line[:MAX_RECORD_BYTES])
    return match.group(1).decode("utf-8", "replace") if match else None
