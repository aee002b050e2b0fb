"""The farm: many VM hosts on Dask distributed, with a ledger that never loses a result.

::

    from pyti_core.farm import run_many

    for result in run_many(["attrs==23.2.0", "six==1.16.0"], ledger="farm.sqlite"):
        print(result.distribution, result.ok)          # each RunResult as it completes

Dask does the scheduling, failure detection and transport: by default an embedded
:class:`distributed.LocalCluster` (worker processes on this machine, listening on 127.0.0.1 only);
with ``client=`` (or ``scheduler="tcp://HOST:8786"``) any Dask cluster whose workers run pyti
(``pyti farm worker``). pyti adds what Dask does not promise, durability, with its ledger
(:mod:`pyti_core.ledger`) on the submitting side:

* a **job** is a spec x an environment x a recipe (:class:`FarmJob`), with a deterministic key; its
  Dask task has that key and asks for the resource ``vm=1``, so no worker runs more VMs than it declared;
* on the worker, the job runs through the same single-run entry point the TaskManager uses
  (:func:`pyti_core.manager.run_prepared`, after fetching the distribution for the guest), on a VM named
  after the job, in a work folder of the worker's own slot;
* the records come back as JSON-RPC 2.0 text and are validated at the edge
  (:func:`pyti_core.rawdata.parse_records`) before they are written to the ledger, once;
* a worker that dies mid-job (kill -9, host lost) makes Dask run the job elsewhere; a job whose workers
  keep dying ends as ``failed`` with the reason once Dask gives up (``KilledWorker``, after
  ``distributed.scheduler.allowed-failures``);
* rerunning with the same ledger runs nothing that is done and resumes the rest.

**Worker set-up** (:class:`FarmWorkerPlugin`, a Dask ``WorkerPlugin``; ``pyti farm worker`` installs it,
``dask worker --preload pyti_core.farm`` too): each worker process takes a *slot*, a folder of its own
under the work folder, locked while it lives. The slot holds the worker's libvirt root (its embedded
QEMU driver) and its jobs' folders, so a worker that restarts in the slot of one that died finds what
that one left — VMs and overlays — and destroys it before running anything. A job cancelled while it
runs has its VM stopped at once; a worker that closes stops every VM it runs.

This is the one module of pyti that imports Dask (``pip install 'pyti[farm]'``).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import dask
import distributed
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker
from distributed.security import Security

from pyti_core.errors import (
    FarmError,
    GuestRunError,
    PytiError,
    RawDataError,
    SchedulerLostError,
)
from pyti_core.ledger import FINAL_STATES, Ledger
from pyti_core.manager import GuestSystem, RunResult
from pyti_core.rawdata import Report
from pyti_core.task_manager import failure_result
from pyti_core.tasks import Recipe, get_recipe

if TYPE_CHECKING:
    from distributed import Worker

    from pyti_core.packages import Distribution
    from vmanager import Connection

__all__ = [
    "EVENT_TOPIC",
    "PLUGIN_NAME",
    "RESOURCE",
    "FarmJob",
    "FarmProgress",
    "FarmRun",
    "FarmWorkerPlugin",
    "fetch_job",
    "make_jobs",
    "run_job",
    "run_many",
    "security_from_files",
    "serve_worker",
]

log = logging.getLogger(__name__)

#: The Dask resource every job asks one of; a worker declares how many VMs it runs at once.
RESOURCE: Final = "vm"
#: The worker plugin's name (one per worker).
PLUGIN_NAME: Final = "pyti-farm"
#: The Dask event topic workers report job starts and progress on.
EVENT_TOPIC: Final = "pyti-farm"
#: With this variable set to 1 in a worker's environment, a job of the recipe named
#: :data:`KILL_WORKER_RECIPE` kills its own worker process (SIGKILL): how the tests show what happens to
#: a job that keeps crashing its workers, through Dask itself. Never set it on a real farm.
TEST_HOOKS_ENV: Final = "PYTI_FARM_TEST_HOOKS"
KILL_WORKER_RECIPE: Final = "pyti-test-kill-worker"
_DASK_KEY_PREFIX: Final = "pyti-farm-"
_FETCH_KEY_PREFIX: Final = "pyti-fetch-"
_SERIAL_TAIL: Final = 64 << 10

#: ``progress(job_label, phase, message)``: job starts on a worker (phase ``"started"``), the run's
#: phases as the worker reports them, ``"done"``/``"failed"`` and ``"ledger"`` (done before), called
#: from Dask's event thread or the caller's thread.
FarmProgress = Callable[[str, str, str], None]


def _no_progress(_job: str, _phase: str, _message: str) -> None:
    pass


# -- jobs -------------------------------------------------------------------------------------------


@attrs.frozen
class FarmJob:
    """One job: ``spec`` (a requirement, or the absolute path of a wheel, sdist or project folder that
    every worker can read) tested with ``recipe`` in the environment ``python`` (``None``: the worker's
    default guest).

    ``guest`` and ``uri`` override the worker's own guest system and hypervisor (their paths must exist
    on the workers); ``find_links``, ``no_index`` and ``index_url`` go to pip on the worker.
    ``spec_digest`` is the SHA-256 of a spec that is a file, so a changed file is a new job.
    """

    spec: str
    recipe: Recipe
    python: str | None = None
    timeout: float = 600.0
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    index_url: str | None = None
    guest: GuestSystem | None = None
    uri: str | None = None
    spec_digest: str = ""

    @property
    def environment(self) -> str:
        """The environment's name: ``py3.12``, ``pypy3``, or ``default`` for the worker's default guest
        (as ``pyti run --python`` names its guests).
        """
        if not self.python:
            return "default"
        return self.python if self.python.startswith("pypy") else f"py{self.python}"

    @property
    def label(self) -> str:
        """``spec [environment]``: how progress and errors name the job."""
        return f"{self.spec} [{self.environment}]"

    @property
    def key(self) -> str:
        """The job's deterministic key: the same spec, environment and recipe give the same key."""
        identity = {
            "spec": self.spec,
            "spec_digest": self.spec_digest,
            "environment": self.environment,
            "recipe": attrs.asdict(self.recipe),
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """What the ledger keeps about the job (JSON)."""
        return {
            "spec": self.spec,
            "spec_digest": self.spec_digest,
            "environment": self.environment,
            "python": self.python,
            "recipe": attrs.asdict(self.recipe),
            "timeout": self.timeout,
        }


def make_jobs(
    specs: Iterable[str | os.PathLike[str]],
    *,
    pythons: Sequence[str] | None = None,
    recipe: str | Recipe = "default",
    timeout: float = 600.0,
    find_links: Sequence[str | os.PathLike[str]] = (),
    no_index: bool = False,
    index_url: str | None = None,
    guest: GuestSystem | None = None,
    uri: str | None = None,
) -> list[FarmJob]:
    """The jobs of a batch: every spec in every environment of ``pythons`` (default: the worker's guest).

    A spec that is a path is made absolute (the workers must see the same path); one that looks like a
    path but does not exist raises ``FileNotFoundError``. Duplicates are dropped.
    """
    the_recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    environments: list[str | None] = list(dict.fromkeys(pythons)) if pythons else [None]
    for python in environments:
        if python is not None and not _is_python_version(python):
            raise ValueError(
                f"not a Python version: {python!r} (expected MAJOR.MINOR such as 3.12, or pypy3)"
            )
    jobs: dict[str, FarmJob] = {}
    for spec in specs:
        text, digest = _spec_identity(spec)
        for python in environments:
            job = FarmJob(
                spec=text,
                recipe=the_recipe,
                python=python,
                timeout=float(timeout),
                find_links=tuple(str(Path(p).absolute()) for p in find_links),
                no_index=no_index,
                index_url=index_url,
                guest=guest,
                uri=uri,
                spec_digest=digest,
            )
            jobs.setdefault(job.key, job)
    return list(jobs.values())


_PYTHON_NAME: Final = re.compile(r"\d{1,3}\.\d{1,3}|pypy\d{0,2}(\.\d{1,3})?")


def _is_python_version(text: str) -> bool:
    """``3.12`` or ``pypy3``: how guests are named."""
    return _PYTHON_NAME.fullmatch(text) is not None


def _spec_identity(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """``(spec text, content digest)``: paths made absolute, files hashed."""
    if isinstance(spec, str) and not (spec.startswith(("/", "./", "../", "~")) or spec.endswith(".whl")):
        return spec, ""
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such file or folder")
    if path.is_file():
        sha = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
        return str(path), sha.hexdigest()
    return str(path), ""


# -- the worker side ----------------------------------------------------------------------------------


class _Runtime:
    """What a worker process keeps for its jobs: its slot, one hypervisor connection, its guest."""

    def __init__(self, plugin: FarmWorkerPlugin) -> None:
        self.plugin = plugin
        self.lock = threading.Lock()
        self.slot: Path | None = None
        self.lock_fd: int | None = None
        self.connection: Connection | None = None
        self.guest: GuestSystem | None = plugin.guest
        self.python_lock = threading.Lock()  # held while a guest builds: not the lock the sweep needs
        self.python_guests: dict[str, GuestSystem] = {}
        self.running: dict[str, str] = {}  # Dask key -> VM name
        self.cancelled: set[str] = set()

    # -- setup and teardown -------------------------------------------------------------------------

    def setup(self) -> None:
        self._take_slot()
        if self.plugin.uri is None:
            # the worker's own embedded QEMU driver lives in its slot, so the next worker in this slot
            # finds what a dead one left (libvirt reads the state of its running guests back)
            os.environ["PYTI_LIBVIRT_ROOT"] = str(self.libvirt_root())
        self.sweep()

    def _take_slot(self) -> None:
        root = self.plugin.work_root()
        root.mkdir(parents=True, exist_ok=True)
        for k in range(1024):
            fd = os.open(root / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self.lock_fd = fd
            self.slot = root / f"slot-{k}"
            self.slot.mkdir(exist_ok=True)
            return
        raise FarmError(f"{root}: no free worker slot (1024 workers already use this work folder)")

    def libvirt_root(self) -> Path:
        """The slot's libvirt root: a short path (QEMU's monitor sockets live under it, and a socket
        path is at most 107 bytes) derived from the slot's, with a ``libvirt`` link in the slot to it.
        """
        digest = hashlib.sha256(str(self.slot_dir.resolve()).encode()).hexdigest()[:16]
        root = Path(tempfile.gettempdir()) / f"pyti-farm-{digest}"
        root.mkdir(mode=0o700, exist_ok=True)
        link = self.slot_dir / "libvirt"
        if not link.is_symlink():
            with contextlib.suppress(OSError):
                link.symlink_to(root)
        return root

    @property
    def slot_dir(self) -> Path:
        if self.slot is None:
            raise FarmError("the pyti worker plugin is not set up")
        return self.slot

    def connect(self) -> Connection:
        """The one hypervisor connection every job of this worker process uses (libvirt's embedded QEMU
        driver is one per process and must not be opened by several threads at once).
        """
        from vmanager import Connection  # noqa: PLC0415 (libvirt only on workers)

        with self.lock:
            if self.connection is None:
                self.connection = Connection(self.plugin.uri)
            return self.connection

    def sweep(self) -> None:
        """Destroy every VM in this slot's hypervisor and delete every job folder: what a dead worker
        left (called at setup, when no job of this process runs yet, and at teardown).
        """
        from vmanager import VirtualMachine, VManagerError  # noqa: PLC0415

        if self.plugin.uri is None or self.plugin.uri.startswith("qemu:///embed"):
            conn = self.connect()
            try:
                names = conn.domain_names()
            except VManagerError as exc:
                log.warning("pyti farm: cannot list the slot's VMs: %s", exc)
                names = []
            for name in names:
                if not name.startswith("pyti-") or name in self.running.values():
                    continue
                log.warning("pyti farm: destroying %s, left by a job that did not finish", name)
                with contextlib.suppress(VManagerError):
                    vm = VirtualMachine(name, conn)
                    try:
                        with contextlib.suppress(VManagerError):
                            vm.stop()
                        vm.undefine()
                    finally:
                        vm.close()
        shutil.rmtree(self.slot_dir / "fetched", ignore_errors=True)
        jobs = self.slot_dir / "jobs"
        if jobs.is_dir():
            for folder in jobs.iterdir():
                if folder.name not in self.running.values():
                    shutil.rmtree(folder, ignore_errors=True)

    def stop_vm(self, name: str) -> None:
        """Stop the VM ``name`` if it runs; its job then reports and cleans up."""
        from vmanager import DomainNotFoundError, VirtualMachine, VManagerError  # noqa: PLC0415

        try:
            vm = VirtualMachine(name, self.connect())
            try:
                vm.stop()
            finally:
                vm.close()
        except DomainNotFoundError:
            pass
        except VManagerError as exc:
            log.warning("pyti farm: could not stop %s: %s", name, exc)

    def teardown(self) -> None:
        for key, name in list(self.running.items()):
            self.cancelled.add(key)
            self.stop_vm(name)
        deadline = time.monotonic() + 30
        while self.running and time.monotonic() < deadline:  # the jobs' own cleanup
            time.sleep(0.2)
        with contextlib.suppress(Exception):
            self.sweep()
            if self.plugin.uri is None and not self.running:
                # nothing left in it: the slot's libvirt root goes when the process exits (libvirt's
                # driver keeps it open until then); a process that dies keeps it for the next one
                atexit.register(shutil.rmtree, self.libvirt_root(), ignore_errors=True)
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None

    def default_guest(self) -> GuestSystem:
        with self.lock:
            if self.guest is None:
                cache = self.plugin.cache_dir
                self.guest = GuestSystem.default(cache / "guest" if cache is not None else None)
            return self.guest

    def guest_for_python(self, python: str) -> GuestSystem:
        """The tiny guest with ``python`` (built into the cache on first use, then reused)."""
        with self.python_lock:
            if python not in self.python_guests:
                cache = self.plugin.cache_dir
                self.python_guests[python] = GuestSystem.for_python(
                    python, cache / "guest" if cache is not None else None
                )
            return self.python_guests[python]


class FarmWorkerPlugin(WorkerPlugin):
    """pyti's set-up of a Dask worker: its slot, hypervisor check, guest cache, and VM cleanup.

    ``work_dir`` holds the slots (default ``<user cache>/pyti/farm``), ``cache_dir`` pyti's cache (the
    guest build and pip's cache), ``uri`` the hypervisor (default: libvirt's QEMU driver embedded in
    the worker process, rooted in its slot), ``guest`` the system jobs boot (default: the tiny Python
    guest, built once into the cache at set-up).
    """

    name = PLUGIN_NAME
    idempotent = True  # registered again by a client: the worker's own set-up is kept

    def __init__(
        self,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        uri: str | None = None,
        guest: GuestSystem | None = None,
        build_guest: bool = True,
    ) -> None:
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.uri = uri
        self.guest = guest
        self.build_guest = build_guest
        self.runtime: _Runtime | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "runtime": None}

    def work_root(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "pyti" / "farm"

    async def setup(self, worker: Worker) -> None:
        runtime = _Runtime(self)
        await asyncio.to_thread(runtime.setup)
        if self.build_guest and self.guest is None:
            await asyncio.to_thread(runtime.default_guest)
        self.runtime = runtime

    async def teardown(self, worker: Worker) -> None:
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.teardown)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        runtime = self.runtime
        if runtime is None or start not in ("executing", "long-running"):
            return
        name = runtime.running.get(str(key))
        if name is not None and finish in ("cancelled", "released", "forgotten"):
            runtime.cancelled.add(str(key))
            threading.Thread(target=runtime.stop_vm, args=(name,), name="pyti-farm-cancel").start()


async def dask_setup(worker: Worker) -> None:
    """``dask worker --preload pyti_core.farm``: install :class:`FarmWorkerPlugin` with its defaults."""
    await worker.plugin_add(FarmWorkerPlugin(), name=PLUGIN_NAME)


def _runtime(worker: Worker) -> _Runtime:
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, FarmWorkerPlugin) or plugin.runtime is None:
        raise FarmError(
            f"worker {worker.address} has no pyti set-up: start it with `pyti farm worker` or "
            "`dask worker --preload pyti_core.farm`"
        )
    return plugin.runtime


def _host_id() -> str:
    """This machine: its name and boot id (a fetched distribution's paths are valid only here)."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()}/{boot}"


def fetch_job(job: FarmJob) -> dict[str, Any] | None:
    """Fetch a job's distribution for the guest on this worker, ahead of its VM and without a VM slot.

    A worker has one thread more than its VMs, so it downloads the next jobs while its guests run, as
    the TaskManager does. Returns what :func:`run_job` needs, or ``None`` when the fetch failed: the run
    then fetches again itself, and reports the error as the job's result.
    """
    worker = get_worker()
    runtime = _runtime(worker)
    folder = runtime.slot_dir / "fetched" / f"{job.key[:16]}-{uuid.uuid4().hex[:6]}"
    t = time.monotonic()
    try:
        distribution = _fetch(job, runtime, _guest_for(job, runtime), folder)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return {
        "distribution": distribution,
        "folder": str(folder),
        "host": _host_id(),
        "seconds": time.monotonic() - t,
    }


def _guest_for(job: FarmJob, runtime: _Runtime) -> GuestSystem:
    guest = job.guest or runtime.default_guest()
    have = ".".join(map(str, guest.target.python_version))
    if job.python is None or have == job.python:
        return guest
    if job.guest is not None or runtime.plugin.guest is not None:  # a guest chosen by the user
        raise FarmError(f"this worker's guest runs Python {have}, not {job.python}")
    try:
        return runtime.guest_for_python(job.python)  # the tiny guest with that Python, as pyti run --python
    except ValueError as exc:  # no Debian suite ships it
        raise FarmError(f"no guest has Python {job.python}: {exc}") from None


def _fetch(job: FarmJob, runtime: _Runtime, guest: GuestSystem, folder: Path) -> Distribution:
    from pyti_core.packages import bundled_pip_wheel, prepare_distribution  # noqa: PLC0415

    cache = runtime.plugin.cache_dir
    spec: str | Path = Path(job.spec) if job.spec.startswith("/") else job.spec
    return prepare_distribution(
        spec,
        folder,
        requirements=guest.recipe_for(job.recipe).requirements,  # not what the guest has preinstalled
        target=guest.target,
        cache_dir=cache / "pip" if cache is not None else None,
        index_url=job.index_url,
        no_index=job.no_index,
        find_links=[Path(p) for p in job.find_links],
        pip_wheel=bundled_pip_wheel(),
    )


def run_job(job: FarmJob, fetched: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run one job on this Dask worker; return its result as JSON-ready data (the report as JSON).

    ``fetched`` is what :func:`fetch_job` returned (used when it was fetched on this machine). Never
    raises for what a run can go through (download failure, boot failure, hypervisor error): those come
    back as one ``error`` record of task ``pyti``, as the TaskManager reports them.
    """
    worker = get_worker()
    runtime = _runtime(worker)
    dask_key = str(worker.get_current_task())
    worker.log_event(
        EVENT_TOPIC, {"key": job.key, "event": "started", "worker": worker.address, "time": time.time()}
    )
    if os.environ.get(TEST_HOOKS_ENV) == "1" and job.recipe.name == KILL_WORKER_RECIPE:
        time.sleep(1.0)  # let the start event reach the scheduler
        os.kill(os.getpid(), signal.SIGKILL)

    def progress(phase: str, message: str) -> None:
        with contextlib.suppress(Exception):
            worker.log_event(EVENT_TOPIC, {"key": job.key, "event": phase, "message": message[:500]})

    name = f"pyti-farm-{job.key[:12]}-{uuid.uuid4().hex[:6]}"
    folder = runtime.slot_dir / "jobs" / name
    runtime.running[dask_key] = name
    started = datetime.now(UTC)
    t0 = time.monotonic()
    phases: dict[str, float] = {}
    found: dict[str, str] = {"distribution": job.spec}  # name==version once downloaded
    try:
        result = _run_in_vm(job, runtime, folder, name, dask_key, phases, found, progress, fetched)
    except GuestRunError as exc:  # GuestBootError too: the serial log says why
        result = _failure(found["distribution"], "error", str(exc), started, t0, phases, exc.serial_log)
    except (PytiError, OSError) as exc:
        why = f"pyti could not run {job.spec}: {exc}"
        result = _failure(found["distribution"], "error", why, started, t0, phases)
    except Exception as exc:  # a job never ends without a result
        why = f"pyti could not run {job.spec}:\n{''.join(traceback.format_exception(exc))}"
        result = _failure(found["distribution"], "error", why, started, t0, phases)
    finally:
        runtime.running.pop(dask_key, None)
        shutil.rmtree(folder, ignore_errors=True)
        if fetched and fetched.get("host") == _host_id():
            shutil.rmtree(str(fetched["folder"]), ignore_errors=True)
    if dask_key in runtime.cancelled:
        runtime.cancelled.discard(dask_key)
        result = _failure(result.distribution, "error", "cancelled", started, t0, phases, result.serial_log)
    return {
        "report": result.report.to_json(),
        "phases": dict(result.phases),
        "timed_out": result.timed_out,
        "serial_tail": result.serial_log[-_SERIAL_TAIL:],
        "worker": worker.address,
    }


def _run_in_vm(  # noqa: PLR0917 (private helper called once)
    job: FarmJob,
    runtime: _Runtime,
    folder: Path,
    name: str,
    dask_key: str,
    phases: dict[str, float],
    found: dict[str, str],
    progress: Callable[[str, str], None],
    fetched: Mapping[str, Any] | None,
) -> RunResult:
    """Fetch the distribution for the guest (unless done already here), then
    :func:`~pyti_core.manager.run_prepared` it.
    """
    from pyti_core.manager import run_prepared  # noqa: PLC0415

    guest = _guest_for(job, runtime)
    distribution: Distribution | None = None
    if fetched and fetched.get("host") == _host_id() and Path(str(fetched["folder"])).is_dir():
        distribution = fetched["distribution"]
        phases["download"] = float(fetched["seconds"])
        progress("download", f"fetched ahead in {phases['download']:.1f} s")
    if distribution is None:
        t = time.monotonic()
        progress("download", f"fetching {job.spec} for the guest")
        distribution = _fetch(job, runtime, guest, folder / "dist")
        phases["download"] = time.monotonic() - t
    found["distribution"] = f"{distribution.name}=={distribution.version}"
    if dask_key in runtime.cancelled:
        raise FarmError("cancelled before its VM started")
    result = run_prepared(
        distribution,
        guest.recipe_for(job.recipe),
        guest=guest,
        timeout=job.timeout,
        work_dir=folder / "run",
        uri=job.uri,
        # one connection for every VM of this worker process (libvirt's embedded driver is one per process)
        connection=runtime.connect() if job.uri is None else None,
        progress=progress,
        name=name,
    )
    return attrs.evolve(result, phases={**phases, **result.phases})


def _failure(  # noqa: PLR0917
    distribution: str,
    status: Literal["error", "timeout"],
    message: str,
    started: datetime,
    t0: float,
    phases: Mapping[str, float],
    serial_log: str = "",
) -> RunResult:
    return failure_result(
        distribution,
        status,
        message,
        started=started,
        duration_s=time.monotonic() - t0,
        phases=dict(phases),
        serial_log=serial_log,
    )


# -- the submitting side ------------------------------------------------------------------------------


def security_from_files(
    ca_file: str | os.PathLike[str], cert: str | os.PathLike[str], key: str | os.PathLike[str] | None = None
) -> Security:
    """Dask TLS with mutual authentication: every party presents ``cert`` (signed by ``ca_file``) and
    accepts only peers whose certificate ``ca_file`` signed; plain TCP is refused.
    """
    for path in (ca_file, cert, key):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file (a TLS CA, certificate or key)")
    parts = {
        "tls_ca_file": str(ca_file),
        "require_encryption": True,
    }
    for role in ("client", "scheduler", "worker"):
        parts[f"tls_{role}_cert"] = str(cert)
        if key is not None:
            parts[f"tls_{role}_key"] = str(key)
    return Security(**parts)


def run_many(
    specs: Iterable[str | os.PathLike[str]],
    *,
    ledger: str | os.PathLike[str],
    client: Client | None = None,
    scheduler: str | None = None,
    security: Security | None = None,
    pythons: Sequence[str] | None = None,
    recipe: str | Recipe = "default",
    timeout: float = 600.0,
    max_vms: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    guest: GuestSystem | None = None,
    uri: str | None = None,
    find_links: Sequence[str | os.PathLike[str]] = (),
    no_index: bool = False,
    index_url: str | None = None,
    retry_failed: bool = False,
    allowed_failures: int | None = None,
    progress: FarmProgress | None = None,
) -> FarmRun:
    """Run every spec in every environment of ``pythons`` on a Dask cluster; yield each
    :class:`~pyti_core.manager.RunResult` as it completes (those already done in the ledger first).

    ``ledger`` is the SQLite file that makes the batch durable: what is ``done`` there is not run
    again, ``failed`` jobs only with ``retry_failed``. The cluster is ``client`` (any Dask client whose
    workers have pyti's set-up), else the scheduler at ``scheduler`` (``security`` for TLS), else a
    :class:`distributed.LocalCluster` on this machine started for the batch: ``max_vms`` worker
    processes of one VM each (default: what the cores and memory allow), listening on 127.0.0.1, with
    their slots in ``work_dir``, pyti's cache in ``cache_dir`` and Dask's ``allowed_failures``.

    ``guest``, ``uri``, ``find_links``, ``no_index`` and ``index_url`` are sent with every job (their
    paths must exist on the workers). Raises :class:`~pyti_core.errors.SchedulerLostError` when the
    scheduler cannot be reached or goes away (rerun to resume), and
    :class:`~pyti_core.errors.LedgerInUseError` when another run holds the ledger. Closing the iterator
    early cancels the jobs still running (their VMs are stopped).
    """
    jobs = make_jobs(
        specs,
        pythons=pythons,
        recipe=recipe,
        timeout=timeout,
        find_links=find_links,
        no_index=no_index,
        index_url=index_url,
        guest=guest,
        uri=uri,
    )
    if max_vms is not None and max_vms < 1:
        raise ValueError(f"max_vms must be at least 1, got {max_vms}")
    batch = _Batch(
        jobs,
        ledger=Path(ledger),
        client=client,
        scheduler=scheduler,
        security=security,
        max_vms=max_vms,
        plugin=FarmWorkerPlugin(work_dir=work_dir, cache_dir=cache_dir, uri=uri, guest=guest),
        retry_failed=retry_failed,
        allowed_failures=allowed_failures,
        progress=progress or _no_progress,
    )
    return FarmRun(jobs, batch.run())


class FarmRun(Iterator[RunResult]):
    """What :func:`run_many` returns: an iterator of results; ``jobs`` are the batch's jobs.

    Closing it (or leaving a ``with`` block) before the end cancels what still runs.
    """

    def __init__(self, jobs: list[FarmJob], results: Iterator[RunResult]) -> None:
        self.jobs: tuple[FarmJob, ...] = tuple(jobs)
        self._results = results

    def __next__(self) -> RunResult:
        return next(self._results)

    def close(self) -> None:
        close = getattr(self._results, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> FarmRun:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _probe_scheduler(address: str, security: Security | None, timeout: str | float) -> None:
    """Connect to the scheduler once (TLS handshake and Dask's own included) before a client is made,
    so an unreachable or refusing scheduler is one clear :class:`SchedulerLostError`.
    """
    from distributed.comm.core import connect  # noqa: PLC0415

    if address.startswith("tls://") and security is None:
        raise SchedulerLostError(
            address,
            f"cannot reach the Dask scheduler at {address}: it speaks TLS; give the farm's CA and your "
            "certificate (--tls-ca-file, --tls-cert, --tls-key; security=security_from_files(...))",
        )
    args = (security or Security()).get_connection_args("client")

    async def probe() -> None:
        comm = await connect(address, timeout=timeout, **args)
        await comm.close()

    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # also from a running event loop (Jupyter)
            pool.submit(asyncio.run, probe()).result()
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerLostError(address, f"cannot reach the Dask scheduler at {address}: {exc}") from exc


def _libvirt_log_to_file() -> None:
    """libvirt's own warnings (one per VM started as root) go to ``<user cache>/pyti/libvirt.log`` in
    the worker processes about to be started, not over the user's terminal; a value set is kept.
    """
    if "LIBVIRT_LOG_OUTPUTS" in os.environ:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyti"
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{cache / 'libvirt.log'}"


class _Batch:
    """One call of :func:`run_many`: the ledger, the cluster, the futures."""

    def __init__(
        self,
        jobs: list[FarmJob],
        *,
        ledger: Path,
        client: Client | None,
        scheduler: str | None,
        security: Security | None,
        max_vms: int | None,
        plugin: FarmWorkerPlugin,
        retry_failed: bool,
        allowed_failures: int | None,
        progress: FarmProgress,
    ) -> None:
        self.jobs = {job.key: job for job in jobs}
        self.ledger_path = ledger
        self.client = client
        self.scheduler = scheduler
        self.security = security
        self.max_vms = max_vms
        self.plugin = plugin
        self.retry_failed = retry_failed
        self.allowed_failures = allowed_failures
        self.progress = progress
        self.ledger: Ledger | None = None

    def _report(self, key: str, phase: str, message: str) -> None:
        try:
            self.progress(self.jobs[key].label, phase, message)
        except Exception:
            log.exception("the progress callback failed")

    def _on_event(self, event: tuple[float, Any]) -> None:
        """A worker's report (Dask's event thread): job starts go to the ledger, all to progress."""
        _, msg = event
        if not isinstance(msg, dict) or msg.get("key") not in self.jobs or self.ledger is None:
            return  # another batch's job on the same scheduler, or a malformed event
        key = str(msg["key"])
        if msg.get("event") == "started":
            worker = str(msg.get("worker", "?"))[:200]
            self.ledger.started(key, worker)
            self._report(key, "started", f"on worker {worker}")
        else:
            self._report(key, str(msg.get("event", "?"))[:40], str(msg.get("message", ""))[:500])

    def run(self) -> Iterator[RunResult]:
        with Ledger(self.ledger_path, lock=True) as ledger:
            self.ledger = ledger
            todo: list[FarmJob] = []
            for key, job in self.jobs.items():
                state = ledger.add(
                    key,
                    spec=job.spec,
                    environment=job.environment,
                    recipe=job.recipe.name,
                    job=job.describe(),
                )
                if state == "failed" and self.retry_failed:
                    ledger.retry(key)
                    state = "pending"
                if state in FINAL_STATES:
                    row = ledger.get(key)
                    assert row is not None
                    self._report(key, "ledger", f"{state} already ({row.distribution or job.spec})")
                    yield row.to_result()
                else:
                    todo.append(job)
            if todo:
                yield from self._run_on_cluster(ledger, todo)
            self.ledger = None

    @contextlib.contextmanager
    def _cluster(self) -> Iterator[Client]:
        if self.client is not None:
            yield self.client
            return
        if self.scheduler is not None:
            # Dask's connect timeout (distributed.comm.timeouts.connect, 30 s by default)
            timeout = dask.config.get("distributed.comm.timeouts.connect")
            _probe_scheduler(self.scheduler, self.security, timeout)
            try:
                client = Client(self.scheduler, security=self.security, timeout=timeout, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise SchedulerLostError(
                    self.scheduler, f"cannot reach the Dask scheduler at {self.scheduler}: {exc}"
                ) from exc
            try:
                yield client
            finally:
                with contextlib.suppress(Exception):
                    client.close(timeout=10)
            return
        if self.max_vms is None:
            from pyti_core.task_manager import default_max_vms  # noqa: PLC0415

            n_workers = default_max_vms()
        else:
            n_workers = self.max_vms
        _libvirt_log_to_file()
        settings: dict[str, Any] = {}
        if self.allowed_failures is not None:
            settings["distributed.scheduler.allowed-failures"] = self.allowed_failures
        with dask.config.set(settings), warnings.catch_warnings():
            # its HTTP server (on 127.0.0.1) takes another port when 8787 is in use: nothing to report
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=2,  # one VM, and one thread fetching the next job meanwhile
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                resources={RESOURCE: 1},
                plugins={self.plugin},
                silence_logs=logging.ERROR,
            )
        try:
            client = Client(cluster, set_as_default=False)
            try:
                yield client
            finally:
                client.close(timeout=10)
        finally:
            cluster.close(timeout=60)

    def _run_on_cluster(self, ledger: Ledger, todo: list[FarmJob]) -> Iterator[RunResult]:
        with self._cluster() as client:
            client.subscribe_topic(EVENT_TOPIC, self._on_event)
            futures: dict[distributed.Future[dict[str, Any]], FarmJob] = {}
            fetches = []
            for job in todo:
                # the download first, on a worker's spare thread; then the VM run, which needs vm=1
                fetch = client.submit(fetch_job, job, key=_FETCH_KEY_PREFIX + job.key, pure=False)
                fetches.append(fetch)
                future = client.submit(
                    run_job,
                    job,
                    fetch,
                    key=_DASK_KEY_PREFIX + job.key,
                    resources={RESOURCE: 1},
                    pure=False,
                    retries=0,
                )
                futures[future] = job
                self._report(job.key, "queued", "submitted")
            finished = False
            try:
                for future in as_completed(futures, loop=client.loop):
                    job = futures[future]
                    result = self._collect(ledger, client, future, job)
                    if result is not None:
                        yield result
                finished = True
            finally:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(EVENT_TOPIC)
                if not finished:
                    with contextlib.suppress(Exception):
                        client.cancel([*futures, *fetches], force=True)

    def _collect(
        self, ledger: Ledger, client: Client, future: distributed.Future[dict[str, Any]], job: FarmJob
    ) -> RunResult | None:
        key = job.key
        try:
            payload = future.result()
        except KilledWorker as exc:
            attempts = exc.allowed_failures + 1
            reason = (
                f"its worker died while running it, {attempts} times (Dask stops after "
                f"distributed.scheduler.allowed-failures = {exc.allowed_failures}); the last one was "
                f"{exc.last_worker.address}: the job may crash its host (memory, hypervisor), see that "
                "worker's log"
            )
            ledger.failed(key, reason, attempts=attempts, worker=exc.last_worker.address)
            self._report(key, "failed", reason)
            row = ledger.get(key)
            assert row is not None
            return row.to_result()
        except FutureCancelledError as exc:
            if exc.reason == "scheduler-connection-lost" or client.status != "running":
                address = self.scheduler or str(getattr(client.scheduler, "address", "the scheduler"))
                done = ledger.counts()["done"]
                raise SchedulerLostError(
                    address,
                    f"the Dask scheduler at {address} went away; {done} job(s) are done in the ledger "
                    f"{ledger.path}: run the same command again to resume the rest",
                ) from exc
            raise FarmError(f"job {job.label} was cancelled on the cluster: {exc}") from exc
        except Exception as exc:  # the runner itself failed on the worker (it never should)
            reason = f"the job failed on its worker: {type(exc).__name__}: {exc}"
            ledger.failed(key, reason)
            self._report(key, "failed", reason)
            row = ledger.get(key)
            assert row is not None
            return row.to_result()
        return self._store(ledger, job, payload)

    def _store(self, ledger: Ledger, job: FarmJob, payload: Any) -> RunResult | None:
        """Validate a worker's result at the edge, write it to the ledger once, and make it a result."""
        key = job.key
        worker = None
        try:
            if not isinstance(payload, dict):
                raise RawDataError(f"a job result is an object, got {type(payload).__name__}")
            worker = str(payload.get("worker", ""))[:200] or None
            report_text = payload.get("report")
            if not isinstance(report_text, str):
                raise RawDataError("the result has no report")
            report = Report.from_json(report_text)  # every record validated, as any guest output
            if not 0 < len(report.distribution) <= 4096:
                raise RawDataError("the report names no distribution")
            phases_raw = payload.get("phases", {})
            phases = {str(k)[:40]: float(v) for k, v in dict(phases_raw).items()}
            serial = payload.get("serial_tail", "")
            serial = serial if isinstance(serial, str) else ""
            timed_out = bool(payload.get("timed_out", False))
        except (RawDataError, TypeError, ValueError) as exc:
            reason = f"its worker {worker or '?'} sent a result that is not valid: {exc}"
            ledger.failed(key, reason, worker=worker)
            self._report(key, "failed", reason)
            row = ledger.get(key)
            assert row is not None
            return row.to_result()
        stored = ledger.finished(
            key, report=report, phases=phases, timed_out=timed_out, serial_tail=serial, worker=worker
        )
        if not stored:
            return None  # a second result for a job already done: exactly one is kept
        ok = bool(report.records) and report.ok
        self._report(key, "done", f"{report.distribution}: {'passed' if ok else 'failed'} on {worker}")
        return RunResult(report.distribution, report, phases, serial, timed_out=timed_out)


# -- pyti farm worker -----------------------------------------------------------------------------------


async def serve_worker(
    scheduler: str,
    *,
    vms: int = 1,
    host: str = "127.0.0.1",
    name: str | None = None,
    security: Security | None = None,
    plugin: FarmWorkerPlugin | None = None,
    nanny: bool = True,
    stop: asyncio.Event | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run a Dask worker for ``scheduler`` with ``vms`` VM slots until ``stop`` is set (or the
    scheduler closes it): ``nthreads=vms + 1`` (one fetches the next jobs), the resource ``vm=vms``,
    pyti's :class:`FarmWorkerPlugin`, listening on ``host`` (127.0.0.1 unless told otherwise). With
    ``nanny`` (the default) a worker process that dies is restarted. ``ready(address)`` is called once
    it is registered.
    """
    from distributed import Nanny, Worker  # noqa: PLC0415

    if vms < 1:
        raise ValueError(f"vms must be at least 1, got {vms}")
    kind: Any = Nanny if nanny else Worker
    server = kind(
        scheduler,
        nthreads=vms + 1,  # its VMs, and one thread fetching the next jobs meanwhile
        resources={RESOURCE: vms},
        host=host,
        name=name,
        security=security,
        plugins=(plugin or FarmWorkerPlugin(),),
        dashboard=False,
    )
    try:
        await server
    except (OSError, TimeoutError, RuntimeError) as exc:  # RuntimeError: "Nanny failed to start"
        cause: BaseException = exc
        while cause.__cause__ is not None and isinstance(cause, RuntimeError):
            cause = cause.__cause__
        if isinstance(cause, OSError | TimeoutError):  # Dask's CommClosedError is an OSError
            raise SchedulerLostError(
                scheduler, f"cannot join the Dask scheduler at {scheduler}: {type(cause).__name__}: {cause}"
            ) from exc
        raise FarmError(f"the worker could not start: {type(cause).__name__}: {cause}") from exc
    try:
        if ready is not None:
            ready(str(server.worker_address if nanny else server.address))
        finished = asyncio.ensure_future(server.finished())
        waits = [finished]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    finally:
        await server.close(timeout=60)
