"""Many runs at once: a bounded number of VMs, each on its own overlay, none ever lost.

::

    from pyti_core.task_manager import TaskManager

    with TaskManager(max_vms=2) as tm:
        futures = [tm.submit(spec, timeout=300) for spec in ("attrs==23.2.0", "six==1.16.0")]
        results = [f.result() for f in futures]          # RunResult objects, in submission order
    # or: results = TaskManager().run_all(["attrs==23.2.0", "six==1.16.0"])

A job goes through two stages. Its **download** (resolving and fetching the wheels for the guest, on the
host) runs in a pool of ``max_downloads`` slots, so the next jobs' downloads overlap the running VMs;
jobs for the same spec (and recipe requirements) share one download.
Its **VM run** (:func:`pyti_core.manager.run_prepared`: IO disk, boot on a throwaway overlay, tasks,
read-back, rollback) waits for one of ``max_vms`` slots. Each job has its own work folder and its own
domain name, so two runs never share an overlay or an IO disk.

**Never lost.** A job's future always ends with a :class:`~pyti_core.manager.RunResult`: a download
that fails, a VM that cannot start, an exception in the run all become one record of task ``pyti``
with status ``error`` and the reason in its ``stderr``. A guest that is still running when the job's
``timeout`` is over (plus :data:`KILL_GRACE_S`, the time the run itself has to notice) is killed by the
manager, and the job is reported with status ``timeout``.

**Several VMs in one process.** libvirt's embedded QEMU driver (``qemu:///embed?root=DIR``, the default)
allows one root per process, and must not be opened by several threads at once: with libvirt 9.0 that
crashes (a segmentation fault) or fails ("Too many drivers"). The TaskManager therefore opens **one**
connection and every job's VM uses it from its own thread. Do not call :func:`pyti_core.manager.run`
from other threads while a TaskManager runs VMs in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs

from pyti_core.channel import ChannelConfig, ChannelEvent
from pyti_core.errors import GuestBootError, GuestRunError, PytiError, TaskManagerClosedError, vmanager_errors
from pyti_core.manager import GuestSystem, ProgressCallback, RunResult, run_prepared
from pyti_core.packages import Distribution, GuestTarget, bundled_pip_wheel, prepare_distribution
from pyti_core.rawdata import RawDataRecord, Report
from pyti_core.tasks import Recipe, get_recipe

if TYPE_CHECKING:
    from vmanager import Connection

__all__ = [
    "DEFAULT_VM_MEMORY_MIB",
    "KILL_GRACE_S",
    "JobProgress",
    "TaskManager",
    "default_max_vms",
    "failure_result",
]

log = logging.getLogger(__name__)

#: Host memory one TCG guest costs: its RAM plus QEMU's own (translation cache, devices), MiB.
DEFAULT_VM_MEMORY_MIB: Final = 768
#: How long after a job's timeout a still-running guest is killed by the manager, seconds. The run
#: itself enforces the timeout first; this is the safety net. PID 1 on some hosts reaps qemu ~2 s late.
KILL_GRACE_S: Final = 30.0
_FAILURE_CAP: Final = 64 * 1024

#: ``(job_name, phase, message)``: progress of every job (phases as in :mod:`pyti_core.manager`, plus
#: ``"queued"`` while a job waits for a VM slot and ``"done"`` when its result is set).
JobProgress = Callable[[str, str, str], None]


def _no_progress(_job: str, _phase: str, _message: str) -> None:
    pass


def _available_memory_mib() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_max_vms(memory_per_vm_mib: int = DEFAULT_VM_MEMORY_MIB) -> int:
    """How many guests this host can run at once: one per CPU core, as far as available memory allows.

    Under TCG every guest keeps one host core busy, so more VMs than cores only makes each slower.
    """
    cores = os.cpu_count() or 1
    memory = _available_memory_mib()
    by_memory = cores if memory is None else max(1, memory // max(1, memory_per_vm_mib))
    return max(1, min(cores, by_memory))


def failure_result(
    distribution: str,
    status: Literal["error", "timeout"],
    message: str,
    *,
    started: datetime,
    duration_s: float,
    phases: dict[str, float] | None = None,
    serial_log: str = "",
    guest: str = "",
) -> RunResult:
    """A :class:`RunResult` holding one record of task ``pyti``: a job that did not produce its own."""
    record = RawDataRecord(
        task_id="pyti",
        task="pyti",
        status=status,
        exit_code=None,
        stdout="",
        stderr=message[-_FAILURE_CAP:],
        started_at=started,
        duration_s=max(0.0, duration_s),
        max_rss_kb=0,
        cpu_user_s=0.0,
        cpu_system_s=0.0,
    )
    return RunResult(
        distribution=distribution,
        report=Report(distribution, (record,)),
        phases=dict(phases or {}),
        serial_log=serial_log,
        guest=guest,
    )


class _Download:
    """One distribution fetched for the guest, shared by every job that asks for the same spec."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.lock = threading.Lock()
        self.distribution: Distribution | None = None


class _Job:
    """One submitted job's bookkeeping (the future is what callers see)."""

    def __init__(
        self,
        name: str,
        spec: str | os.PathLike[str],
        recipe: Recipe,
        timeout: float,
        guest: GuestSystem | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.recipe = recipe
        self.timeout = timeout
        self.guest = guest  # None: the manager's
        self.future: Future[RunResult] = Future()
        self.distribution = str(spec)
        self.started = datetime.now(UTC)
        self.t0 = time.monotonic()
        self.vm_started: float | None = None
        self.vm_deadline: float | None = None  # monotonic time at which the watchdog kills the guest
        self.killed = False
        self.phases: dict[str, float] = {}


class TaskManager:
    """Run many distributions' tests with at most ``max_vms`` guests at once.

    Args:
        max_vms: guests running at the same time; default :func:`default_max_vms`.
        guest: the system to boot; default :meth:`GuestSystem.default` (built once, when first needed).
        uri: the hypervisor; default libvirt's embedded QEMU driver.
        work_dir: where each job gets its folder (``<work_dir>/<job name>``); default a temporary
            folder removed by :meth:`close`.
        cache_dir: pyti's cache (the guest build in ``cache_dir/guest``, pip's cache in ``cache_dir/pip``).
        max_downloads: downloads running at the same time (default 2).
        progress: ``progress(job_name, phase, message)``, called from worker threads.
        keep: keep each job's work folder (IO disk, serial log) after it finished.
        kill_grace_s: how long after its timeout a job's guest is killed, if the run has not stopped it.
        find_links, no_index, index_url: passed to pip for every download.
        channel: the live channel's settings for every job (``None``: off), as in :func:`pyti_core.run`.
        on_event: ``on_event(job_name, event)`` for every live-channel event, from the channels' threads.

    Use it as a context manager: leaving the block waits for the submitted jobs, unless an exception
    is propagating, in which case queued jobs are cancelled and running guests are killed.
    """

    def __init__(
        self,
        max_vms: int | None = None,
        *,
        guest: GuestSystem | None = None,
        uri: str | None = None,
        work_dir: Path | None = None,
        cache_dir: Path | None = None,
        max_downloads: int = 2,
        memory_per_vm_mib: int = DEFAULT_VM_MEMORY_MIB,
        progress: JobProgress | None = None,
        keep: bool = False,
        kill_grace_s: float = KILL_GRACE_S,
        find_links: Sequence[Path] = (),
        no_index: bool = False,
        index_url: str | None = None,
        channel: ChannelConfig | None = ChannelConfig(),  # noqa: B008 (frozen: safe to share)
        on_event: Callable[[str, ChannelEvent], None] | None = None,
    ) -> None:
        if max_vms is not None and max_vms < 1:
            raise ValueError(f"max_vms must be at least 1, got {max_vms}")
        if max_downloads < 1:
            raise ValueError(f"max_downloads must be at least 1, got {max_downloads}")
        self.max_vms = max_vms if max_vms is not None else default_max_vms(memory_per_vm_mib)
        self.max_downloads = max_downloads
        self.uri = uri
        self.cache_dir = cache_dir
        self.keep = keep
        self.kill_grace_s = kill_grace_s
        self.find_links = tuple(find_links)
        self.no_index = no_index
        self.index_url = index_url
        self.channel = channel
        self._on_event = on_event
        self._guest = guest
        self._guest_lock = threading.Lock()
        self._user_progress = progress or _no_progress
        self._own_work_dir = work_dir is None
        self.work_dir = (
            Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pyti-jobs-"))
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._vm_slots = threading.BoundedSemaphore(self.max_vms)
        self._download_slots = threading.BoundedSemaphore(self.max_downloads)
        self._pool = ThreadPoolExecutor(self.max_vms + self.max_downloads, thread_name_prefix="pyti-job")
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._downloads: dict[tuple[str, tuple[str, ...], GuestTarget], _Download] = {}
        self._connection: Connection | None = None
        self._connection_lock = threading.Lock()
        self._closed = False
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="pyti-watchdog", daemon=True)
        self._watchdog.start()

    # -- public API ---------------------------------------------------------------------------------

    @property
    def guest(self) -> GuestSystem:
        """The system every job boots (built or loaded on first use)."""
        with self._guest_lock:
            if self._guest is None:
                self._guest = GuestSystem.default(self.cache_dir / "guest" if self.cache_dir else None)
            return self._guest

    def submit(
        self,
        spec: str | os.PathLike[str],
        *,
        recipe: str | Recipe = "default",
        timeout: float = 600.0,
        name: str | None = None,
        guest: GuestSystem | None = None,
    ) -> Future[RunResult]:
        """Queue one job; its future ends with a :class:`RunResult` (never with an exception).

        ``timeout`` bounds the VM run (boot, tasks, read-back); the download before it is not counted.
        ``name`` is the job's (and its domain's) name; default ``pyti-<8 hex digits>``. ``guest`` is the
        system this job boots (default: the manager's); jobs of different guests (a matrix of Pythons)
        share the VM slots, and their downloads are resolved per guest.
        Raises :class:`TaskManagerClosedError` after :meth:`close`, ``ValueError`` for a bad timeout,
        and :class:`~pyti_core.errors.TaskError` for an unknown recipe.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        resolved = get_recipe(recipe) if isinstance(recipe, str) else recipe
        with self._lock:
            if self._closed:
                raise TaskManagerClosedError("this TaskManager is closed; create a new one to run more jobs")
            job_name = name or f"pyti-{uuid.uuid4().hex[:8]}"
            if job_name in self._jobs:
                raise ValueError(f"a job named {job_name!r} was already submitted")
            job = _Job(job_name, spec, resolved, float(timeout), guest)
            self._jobs[job_name] = job
        self._progress(job_name, "queued", f"{spec}")
        self._pool.submit(self._run_job, job)
        return job.future

    def run_all(
        self,
        specs: Iterable[str | os.PathLike[str]],
        *,
        recipe: str | Recipe = "default",
        timeout: float = 600.0,
    ) -> list[RunResult]:
        """Run every spec and return their results in the same order."""
        futures = [self.submit(spec, recipe=recipe, timeout=timeout) for spec in specs]
        return [f.result() for f in futures]

    def close(self, *, cancel: bool = False) -> None:
        """Stop taking jobs; wait for the submitted ones, or with ``cancel=True`` drop the queued ones and
        kill every running guest (their futures end with ``error`` results). Idempotent.
        """
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        if cancel:
            self._stopping.set()
            pending = [j for j in jobs if not j.future.done()]
            while pending:  # again and again: a VM may be defined just after a kill found none
                for job in pending:
                    job.killed = True
                    if job.vm_started is not None:
                        self._kill(job, "the TaskManager was closed")
                wait([j.future for j in pending], timeout=2.0)
                pending = [j for j in pending if not j.future.done()]
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._stopping.set()
        self._watchdog.join(timeout=5)
        with self._connection_lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        if self._own_work_dir and not self.keep:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif not self.keep:
            shutil.rmtree(self.work_dir / "downloads", ignore_errors=True)

    def __enter__(self) -> TaskManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(cancel=exc_type is not None)

    # -- one job ------------------------------------------------------------------------------------

    def _progress(self, job: str, phase: str, message: str) -> None:
        """Call the user's progress callback; its exceptions are logged, never allowed to lose a job."""
        try:
            self._user_progress(job, phase, message)
        except Exception:
            log.exception("the progress callback failed (job %s, phase %s)", job, phase)

    def _job_events(self, job: _Job) -> Callable[[ChannelEvent], None] | None:
        user = self._on_event
        if user is None:
            return None

        def relay(event: ChannelEvent) -> None:
            user(job.name, event)

        return relay

    def _job_progress(self, job: _Job) -> ProgressCallback:
        def report(phase: str, message: str) -> None:
            self._progress(job.name, phase, message)

        return report

    def _run_job(self, job: _Job) -> None:
        # download, hypervisor: the message says it all
        expected: tuple[type[Exception], ...] = (PytiError, OSError, *vmanager_errors())
        try:
            result = self._run_stages(job)
        except GuestBootError as exc:  # never ready: a timeout if it ran that long, else it stopped early
            waited = time.monotonic() - (job.vm_started or job.t0)
            limit = min(self._guest_of(job).boot_timeout, job.timeout)
            status: Literal["error", "timeout"] = "timeout" if waited >= limit else "error"
            result = self._failure(job, status, str(exc), serial=exc.serial_log)
        except GuestRunError as exc:
            result = self._failure(job, "error", str(exc), serial=exc.serial_log)
        except expected as exc:
            result = self._failure(job, "error", f"pyti could not run {job.spec}: {exc}")
        except Exception as exc:  # a job never ends without a result
            log.exception("job %s (%s) failed", job.name, job.spec)
            text = "".join(traceback.format_exception(exc))
            result = self._failure(job, "error", f"pyti could not run {job.spec}:\n{text}")
        finally:
            job.vm_deadline = None
        if job.killed and self._stopping.is_set():
            result = self._failure(
                job, "error", "cancelled: the TaskManager was closed", serial=result.serial_log
            )
        elif job.killed and not any(r.status == "timeout" for r in result.report.records):
            reason = (
                f"the guest was still running {job.timeout:g} s (+{self.kill_grace_s:g} s) after the VM "
                "started and was killed"
            )
            result = self._failure(job, "timeout", reason, serial=result.serial_log)
        self._progress(job.name, "done", "passed" if result.ok else "failed")
        with contextlib.suppress(Exception):
            job.future.set_result(result)
        if not self.keep:
            shutil.rmtree(self.work_dir / job.name, ignore_errors=True)

    def _guest_of(self, job: _Job) -> GuestSystem:
        return job.guest if job.guest is not None else self.guest

    def _run_stages(self, job: _Job) -> RunResult:
        guest = self._guest_of(job)
        job.recipe = guest.recipe_for(job.recipe)  # the guest's preinstalled test tooling is not fetched
        folder = self.work_dir / job.name
        folder.mkdir(parents=True, exist_ok=True)
        if self._stopping.is_set():
            return self._failure(job, "error", "cancelled: the TaskManager was closed before the job ran")
        with self._download_slots:
            self._progress(job.name, "download", f"fetching {job.spec} for the guest")
            t = time.monotonic()
            dist = self._download(job)
            job.phases["download"] = time.monotonic() - t
        job.distribution = f"{dist.name}=={dist.version}"
        self._progress(job.name, "queued", "waiting for a VM slot")
        with self._vm_slots:
            if self._stopping.is_set():
                return self._failure(job, "error", "cancelled: the TaskManager was closed before the job ran")
            job.vm_started = time.monotonic()
            job.vm_deadline = job.vm_started + job.timeout + self.kill_grace_s
            result = run_prepared(
                dist,
                job.recipe,
                guest=guest,
                timeout=job.timeout,
                work_dir=folder / "run",
                # one connection for every VM of this process: see _shared_connection
                connection=self._shared_connection(),
                progress=self._job_progress(job),
                name=job.name,
                channel=self.channel,
                on_event=self._job_events(job),
            )
        return attrs.evolve(result, phases={**job.phases, **result.phases})

    def _download(self, job: _Job) -> Distribution:
        """Fetch the job's distribution, once per spec and requirements: later jobs share the files."""
        spec: str | Path = job.spec if isinstance(job.spec, str) else Path(job.spec).resolve()
        target = self._guest_of(job).target
        key = (str(spec), job.recipe.requirements, target)
        with self._lock:
            entry = self._downloads.setdefault(key, _Download(len(self._downloads)))
        with entry.lock:
            if entry.distribution is None:
                entry.distribution = prepare_distribution(
                    spec,
                    self.work_dir / "downloads" / str(entry.number),
                    requirements=job.recipe.requirements,
                    target=target,
                    cache_dir=self.cache_dir / "pip" if self.cache_dir is not None else None,
                    index_url=self.index_url,
                    no_index=self.no_index,
                    find_links=self.find_links,
                    pip_wheel=bundled_pip_wheel(),
                )
            return entry.distribution

    def _failure(
        self, job: _Job, status: Literal["error", "timeout"], message: str, serial: str = ""
    ) -> RunResult:
        return failure_result(
            job.distribution,
            status,
            message,
            started=job.started,
            duration_s=time.monotonic() - job.t0,
            phases=job.phases,
            serial_log=serial,
            guest=next((g.name for g in (job.guest, self._guest) if g is not None), ""),
        )

    # -- the watchdog -------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            now = time.monotonic()
            with self._lock:
                overdue = [
                    j for j in self._jobs.values() if j.vm_deadline is not None and now > j.vm_deadline
                ]
            for job in overdue:
                self._kill(job, f"job timeout of {job.timeout:g} s")

    def _kill(self, job: _Job, why: str) -> None:
        """Destroy the job's domain, if it runs; the run then fails and the job is reported."""
        from vmanager import DomainNotFoundError, VirtualMachine, VManagerError  # noqa: PLC0415

        job.killed = True
        job.vm_deadline = None
        log.warning("job %s: killing its guest (%s)", job.name, why)
        try:
            vm = VirtualMachine(job.name, self._shared_connection())
            try:
                vm.stop()
            finally:
                vm.close()  # an injected connection stays open
        except DomainNotFoundError:
            pass  # not defined yet, or already gone: the run notices the stop flag or has finished
        except VManagerError as exc:
            log.warning("job %s: could not kill its guest: %s", job.name, exc)

    def _shared_connection(self) -> Connection:
        """The one hypervisor connection every job's VM uses, opened on first use.

        libvirt's embedded QEMU driver must not be opened once per thread: concurrent
        ``qemu:///embed`` connections in one process crash libvirt 9.0 (a segmentation fault in
        ``defineXML`` while another thread opens its connection) or fail with "Too many drivers,
        cannot register QEMU". One connection shared by all threads works (libvirt connections are
        thread-safe); it also lets the watchdog reach the jobs' domains on a private test driver.
        """
        from vmanager import Connection  # noqa: PLC0415

        with self._connection_lock:
            if self._connection is None:
                self._connection = Connection(self.uri)
            return self._connection

    def jobs(self) -> Iterator[tuple[str, bool]]:
        """``(name, done)`` for every job submitted so far."""
        with self._lock:
            items = list(self._jobs.values())
        for job in items:
            yield job.name, job.future.done()
