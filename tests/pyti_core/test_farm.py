"""The farm: jobs on real Dask clusters, a ledger that never loses or doubles a result.

Fast tests drive the ledger and the job keys directly. The ``farm`` tests start a real ``dask
scheduler`` and ``pyti farm worker`` processes on 127.0.0.1; those that need no guest use libvirt's
test driver on the workers (a "guest" that never boots: each job is a quick boot-timeout result), and
the ``qemu`` one runs real TCG guests: one worker killed with SIGKILL mid-job, every job done exactly
once, and the same command again doing no work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest

pytest.importorskip("distributed")

from distributed.security import Security

from pyti_core.errors import LedgerError, LedgerInUseError, SchedulerLostError
from pyti_core.farm import FarmJob, FarmProgress, make_jobs, run_many, security_from_files
from pyti_core.ledger import Ledger
from pyti_core.manager import GuestSystem, RunResult
from pyti_core.rawdata import RawDataRecord, Report
from pyti_core.tasks import Recipe, Task
from tests.pyti_core.farmtools import BIN, Cluster, cluster_in, make_ca_and_certs, pyti
from tests.pyti_core.test_task_manager import HAVE_QEMU, make_wheel

HOOKS = {"PYTI_FARM_TEST_HOOKS": "1"}


def record(task: str, status: str = "passed") -> RawDataRecord:
    return RawDataRecord(
        task_id=task,
        task=task,
        status=status,  # type: ignore[arg-type]
        exit_code=0,
        stdout="",
        stderr="",
        started_at=datetime(2026, 12, 1, tzinfo=UTC),
        duration_s=1.0,
        max_rss_kb=100,
        cpu_user_s=0.1,
        cpu_system_s=0.0,
    )


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    for name in ("farma", "farmb", "farmc"):
        make_wheel(folder, name, "1.0", {f"{name}/__init__.py": "X = 1\n"})
    return folder


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    yield from cluster_in(tmp_path / "cluster")


def fake_guest(folder: Path, boot_timeout: float) -> GuestSystem:
    """Files that exist; on libvirt's test driver the "guest" never prints its ready marker."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vmlinuz").write_bytes(b"not a kernel")
    (folder / "initrd").write_bytes(b"not an initrd")
    return GuestSystem(kernel=folder / "vmlinuz", initrd=folder / "initrd", boot_timeout=boot_timeout)


# -- jobs and keys -------------------------------------------------------------------------------------


def test_job_keys_are_deterministic_per_spec_environment_and_recipe(tmp_path: Path, wheels: Path) -> None:
    wheel = wheels / "farma-1.0-py3-none-any.whl"
    first = make_jobs(["six==1.16.0", wheel, "six==1.16.0"], pythons=["3.11", "3.12", "3.11"])
    again = make_jobs(["six==1.16.0", str(wheel)], pythons=["3.11", "3.12"])
    assert [j.key for j in first] == [j.key for j in again]  # duplicates dropped, paths made absolute
    assert len({j.key for j in first}) == 4
    assert [(j.spec, j.environment) for j in first][:2] == [
        ("six==1.16.0", "py3.11"),
        ("six==1.16.0", "py3.12"),
    ]
    other_recipe = make_jobs(["six==1.16.0"], pythons=["3.11"], recipe="install-only")
    assert other_recipe[0].key != first[0].key
    assert make_jobs(["six==1.16.0"], pythons=["pypy3"])[0].environment == "pypy3"
    default_env = make_jobs(["six==1.16.0"])[0]
    assert (default_env.environment, default_env.python) == ("default", None)
    # a wheel rebuilt with other content is another job
    before = make_jobs([wheel])[0].key
    make_wheel(wheels, "farma", "1.0", {"farma/__init__.py": "X = 2\n"})
    assert make_jobs([wheel])[0].key != before
    with pytest.raises(ValueError, match="not a Python version"):
        make_jobs(["six"], pythons=["3"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        make_jobs([tmp_path / "missing-1.0-py3-none-any.whl"])


# -- the ledger ----------------------------------------------------------------------------------------


def _add(ledger: Ledger, job: FarmJob) -> str:
    return ledger.add(
        job.key, spec=job.spec, environment=job.environment, recipe=job.recipe.name, job=job.describe()
    )


def test_the_ledger_keeps_exactly_one_result_per_job(tmp_path: Path) -> None:
    job, other = make_jobs(["a==1", "b==2"])
    path = tmp_path / "farm.sqlite"
    with Ledger(path, lock=True) as ledger:
        assert _add(ledger, job) == "pending"
        ledger.started(job.key, "tcp://127.0.0.1:1")
        ledger.started(job.key, "tcp://127.0.0.1:2")  # its first worker died: Dask ran it again
        assert ledger.get(job.key).state == "running"  # type: ignore[union-attr]
        first = ledger.finished(
            job.key, report=Report("a==1", (record("install"),)), phases={"boot": 1.0},
            timed_out=False, serial_tail="x" * 100_000, worker="tcp://127.0.0.1:2",
        )  # fmt: skip
        late = ledger.finished(
            job.key, report=Report("a==1", (record("install", "failed"),)), phases={},
            timed_out=False, serial_tail="", worker="tcp://127.0.0.1:1",
        )  # fmt: skip
        assert (first, late) == (True, False)
        assert ledger.failed(job.key, "too late") is False
        ledger.started(job.key, "tcp://127.0.0.1:3")  # a start event that arrives after the result
        _add(ledger, other)
        ledger.started(other.key, "tcp://127.0.0.1:1")
    # a new submitter: the running job (its submitter stopped) is pending again, the done one stays
    with Ledger(path, lock=True) as ledger:
        assert _add(ledger, other) == "pending"
        assert _add(ledger, job) == "done"
        row = ledger.get(job.key)
        assert row is not None
        assert (row.state, row.attempts, row.ok, row.worker) == ("done", 3, True, "tcp://127.0.0.1:2")
        assert [r.status for r in row.records] == ["passed"]
        assert len(row.serial_tail) == 64 << 10
        assert ledger.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 0}
        ledger.failed(other.key, "its worker died", attempts=4)
        failed = ledger.get(other.key)
        assert failed is not None
        assert (failed.state, failed.attempts, failed.reason) == ("failed", 4, "its worker died")
        (result_record,) = failed.to_result().report.records
        assert result_record.status == "error"
        assert "its worker died" in result_record.stderr
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone() == (2,)


def test_the_ledger_refuses_a_second_submitter_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "farm.sqlite"
    with Ledger(path, lock=True):
        with pytest.raises(LedgerInUseError, match=f"pid {os.getpid()}"):
            Ledger(path, lock=True)
        with Ledger(path) as reader:  # reading while a run writes is fine
            assert reader.counts()["done"] == 0
    foreign = tmp_path / "other.sqlite"
    sqlite3.connect(foreign).execute("CREATE TABLE users (name TEXT)").connection.commit()
    with pytest.raises(LedgerError, match="not a pyti ledger"):
        Ledger(foreign)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not SQLite at all" * 100)
    with pytest.raises(LedgerError, match="not a pyti ledger"):
        Ledger(junk)
    with pytest.raises(LedgerError, match="no such ledger"):
        Ledger(tmp_path / "none.sqlite", create=False)
    # records edited by hand into something invalid are caught when read back
    with Ledger(path) as ledger:
        job = make_jobs(["a==1"])[0]
        _add(ledger, job)
        ledger.finished(job.key, report=Report("a==1", (record("t"),)), phases={}, timed_out=False,
                        serial_tail="", worker=None)  # fmt: skip
    db = sqlite3.connect(path)
    damaged = {"distribution": "a==1", "records": [{"jsonrpc": "2.0", "method": "x"}]}
    db.execute("UPDATE jobs SET report=?", (json.dumps(damaged),))
    db.commit()
    with Ledger(path) as ledger, pytest.raises(LedgerError, match="stored report is damaged"):
        ledger.rows()


def test_a_worker_result_is_validated_at_the_edge(tmp_path: Path) -> None:
    from pyti_core.farm import FarmWorkerPlugin, _Batch

    jobs = make_jobs(["a==1", "b==1", "c==1"])
    batch = _Batch(
        jobs, ledger=tmp_path / "l.sqlite", client=None, scheduler=None, security=None, max_vms=1,
        plugin=FarmWorkerPlugin(), retry_failed=False, allowed_failures=None, progress=lambda *_: None,
    )  # fmt: skip
    good = Report("a==1", (record("install"),)).to_json()
    bad_record = json.dumps(
        {"distribution": "b==1", "records": [{**record("install").to_jsonrpc(), "id": 7}]}
    )  # a request, not a notification
    with Ledger(tmp_path / "l.sqlite") as ledger:
        for job in jobs:
            _add(ledger, job)
        ok = batch._store(ledger, jobs[0], {"report": good, "worker": "tcp://w"})
        assert ok is not None
        assert ok.ok
        bad = batch._store(ledger, jobs[1], {"report": bad_record, "worker": "tcp://w"})
        assert bad is not None
        assert not bad.ok
        junk = batch._store(ledger, jobs[2], ["not", "a", "result"])
        assert junk is not None
        assert not junk.ok
        assert batch._store(ledger, jobs[0], {"report": good}) is None  # once
        rows = {r.spec: r for r in ledger.rows()}
    assert rows["a==1"].state == "done"
    assert rows["b==1"].state == "failed"
    assert "not be a request" in (rows["b==1"].reason or "") or "notification" in (rows["b==1"].reason or "")
    assert rows["c==1"].state == "failed"
    assert "is an object" in (rows["c==1"].reason or "")


def test_status_and_report_read_a_ledger_without_a_cluster(tmp_path: Path) -> None:
    from tests.pyti_core.test_cli import run_cli

    path = tmp_path / "farm.sqlite"
    done, failed, waiting = make_jobs(["good==1.0", "crash==2.0", "later==3.0"], pythons=["3.11"])
    with Ledger(path) as ledger:
        for job in (done, failed, waiting):
            _add(ledger, job)
        ledger.started(done.key, "tcp://127.0.0.1:4000")
        ledger.finished(
            done.key, report=Report("good==1.0", (record("install"), record("import"))),
            phases={}, timed_out=False, serial_tail="", worker="tcp://127.0.0.1:4000",
        )  # fmt: skip
        ledger.failed(failed.key, "its worker died while running it, 2 times", attempts=2)
    code, out, _ = run_cli("farm", "status", "--ledger", str(path))
    assert code == 0
    assert out.splitlines()[0] == f"{path}: 3 job(s): pending 1, running 0, done 1, failed 1"
    assert "crash==2.0 [py3.11]  after 2 attempt(s): its worker died while running it, 2 times" in out
    assert "good==1.0 [py3.11]  passed on tcp://127.0.0.1:4000 (1 attempt(s))" in out
    code, out, err = run_cli("farm", "report", "--ledger", str(path), "--report", str(tmp_path / "reports"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == [
        "crash-2.0-py3.11.json",
        "good-1.0-py3.11.json",
    ]
    report = json.loads((tmp_path / "reports" / "good-1.0-py3.11.json").read_text())
    assert [r["params"]["task"] for r in report["records"]] == ["install", "import"]
    assert "1 job(s) not finished yet" in err
    assert run_cli("farm", "status", "--ledger", str(tmp_path / "none.sqlite"))[0] == 3
    assert run_cli("farm", "run", "x==1")[0] == 2  # --ledger is required
    assert run_cli("farm", "run", "x==1", "--ledger", str(path), "--python", "3")[0] == 2


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    from tests.pyti_core.farmtools import free_port

    env = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    address = f"tcp://127.0.0.1:{free_port()}"
    done = pyti(
        "farm", "run", "x==1", "--ledger", str(tmp_path / "l.sqlite"), "--scheduler", address, env=env
    )
    assert done.returncode == 3, done.stderr
    assert f"pyti: error: cannot reach the Dask scheduler at {address}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.e2e  # builds the tiny guests with these Pythons when the cache has none (minutes)
def test_a_worker_runs_each_python_in_the_guest_with_that_python(tmp_path: Path) -> None:
    from pyti_core import farm
    from pyti_core.errors import FarmError
    from pyti_core.tasks import get_recipe

    runtime = farm._Runtime(farm.FarmWorkerPlugin(build_guest=False))  # the user's guest cache
    job = FarmJob(spec="x==1", recipe=get_recipe("default"))
    for python, implementation, version in [("3.13", "cp", (3, 13)), ("pypy3", "pp", (3, 9))]:
        guest = farm._guest_for(attrs.evolve(job, python=python), runtime)
        assert (guest.name, guest.target.implementation, guest.target.python_version[:2]) == (
            python,
            implementation,
            version,
        )
        assert farm._guest_for(attrs.evolve(job, python=python), runtime) is guest  # built once
    with pytest.raises(FarmError, match=r"no guest has Python 3\.12"):
        farm._guest_for(attrs.evolve(job, python="3.12"), runtime)
    own = farm._Runtime(farm.FarmWorkerPlugin(guest=GuestSystem(kernel=tmp_path / "k"), build_guest=False))
    with pytest.raises(FarmError, match=r"this worker's guest runs Python 3\.11, not 3\.13"):
        farm._guest_for(attrs.evolve(job, python="3.13"), own)


# -- real clusters (no guest) ------------------------------------------------------------------------


@pytest.mark.farm
def test_a_job_that_kills_its_worker_twice_ends_failed_with_its_reason(
    tmp_path: Path, wheels: Path, cluster: Cluster
) -> None:
    cluster.scheduler(env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    for name in ("w1", "w2"):
        cluster.worker(name, "--uri", "test:///default", "--work-dir", str(tmp_path / name), env=HOOKS)
    guest = fake_guest(tmp_path / "guest", boot_timeout=1)
    crash = Recipe("pyti-test-kill-worker", (Task("install", "install"),))
    ledger = tmp_path / "farm.sqlite"
    wheel = wheels / "farma-1.0-py3-none-any.whl"

    def farm(recipe: Recipe | str) -> list[RunResult]:
        return list(
            run_many([wheel], ledger=ledger, scheduler=cluster.address, guest=guest, recipe=recipe,
                     find_links=[wheels], no_index=True)
        )  # fmt: skip

    results = farm(crash)
    (result,) = results
    (rec,) = result.report.records
    assert rec.status == "error"
    assert "its worker died while running it, 2 times" in rec.stderr
    assert "allowed-failures = 1" in rec.stderr
    with Ledger(ledger) as book:
        (row,) = book.rows()
    assert (row.state, row.attempts) == ("failed", 2)
    assert row.reason == rec.stderr.removeprefix("pyti farm: ")
    # the workers came back (their nannies restarted them) and still run ordinary jobs
    (normal,) = farm("install-only")
    (boot,) = normal.report.records
    assert "PYTI-GUEST-READY" in boot.stderr  # the test driver's guest never boots: a result all the same
    # a failed job stays failed on a rerun, unless asked
    (again,) = farm(crash)
    assert "its worker died" in again.report.records[0].stderr
    with Ledger(ledger) as book:
        assert book.counts() == {"pending": 0, "running": 0, "done": 1, "failed": 1}
        assert {r.recipe: r.attempts for r in book.rows()} == {"pyti-test-kill-worker": 2, "install-only": 1}


@pytest.mark.farm
def test_the_scheduler_going_away_is_a_clear_error_and_the_rerun_resumes(
    tmp_path: Path, wheels: Path, cluster: Cluster
) -> None:
    scheduler = cluster.scheduler()
    cluster.worker("w1", "--uri", "test:///default", "--work-dir", str(tmp_path / "w1"))
    guest = fake_guest(tmp_path / "guest", boot_timeout=5)
    ledger = tmp_path / "farm.sqlite"
    specs = sorted(wheels.glob("*.whl"))[:2]

    def farm(address: str, progress: FarmProgress | None = None) -> list[RunResult]:
        return list(
            run_many(specs, ledger=ledger, scheduler=address, guest=guest, recipe="install-only",
                     find_links=[wheels], no_index=True, progress=progress)
        )  # fmt: skip

    def kill_the_scheduler_once_a_job_runs(_job: str, phase: str, _message: str) -> None:
        if phase == "started" and scheduler.popen.poll() is None:
            scheduler.kill_group(signal.SIGKILL)

    with pytest.raises(
        SchedulerLostError, match=r"went away; 0 job\(s\) are done .* run the same command again"
    ):
        farm(cluster.address, kill_the_scheduler_once_a_job_runs)
    with Ledger(ledger) as book:
        counts = book.counts()
    assert counts["done"] == 0
    assert counts["running"] == 1  # as far as the ledger knows: the next run makes it pending again
    # the rerun (here on a new scheduler) runs both jobs; the interrupted one for the second time
    cluster.scheduler()
    cluster.worker("w2", "--uri", "test:///default", "--work-dir", str(tmp_path / "w2"))
    results = farm(cluster.address)
    assert len(results) == 2
    with Ledger(ledger) as book:
        rows = book.rows()
    assert [r.state for r in rows] == ["done", "done"]
    assert sorted(r.attempts for r in rows) == [1, 2]


@pytest.mark.farm
def test_an_interrupted_run_stops_its_vm_at_once_and_the_ledger_keeps_the_job(
    tmp_path: Path, wheels: Path, cluster: Cluster
) -> None:
    cluster.scheduler()
    # the worker's guest under libvirt's test driver: it would wait 90 s for a boot that never comes
    cluster.worker("w1", "--uri", "test:///default", "--work-dir", str(tmp_path / "w1"))
    wheel = wheels / "farma-1.0-py3-none-any.whl"
    ledger = tmp_path / "farm.sqlite"
    argv = [
        "farm", "run", str(wheel), "--ledger", str(ledger), "--scheduler", cluster.address,
        "--recipe", "install-only", "--find-links", str(wheels), "--no-index", "--plain",
    ]  # fmt: skip
    submitter = cluster.start("submitter", [str(BIN / "pyti"), *argv])
    submitter.wait_for(r"boot: \S+ \[default\]: starting VM")
    job_folders = tmp_path / "w1"
    assert list(job_folders.glob("slot-*/jobs/*"))
    t0 = time.monotonic()
    submitter.popen.send_signal(signal.SIGINT)  # Ctrl-C
    assert submitter.popen.wait(timeout=60) == 130
    assert "pyti: interrupted" in submitter.text()
    # the worker stopped the cancelled job's VM: the run cleaned up long before its 90 s boot timeout
    while list(job_folders.glob("slot-*/jobs/*")):
        assert time.monotonic() - t0 < 30, "the cancelled job's VM was not stopped"
        time.sleep(0.2)
    with Ledger(ledger) as book:
        (row,) = book.rows()
    assert (row.state, row.attempts) == ("running", 1)  # as far as the ledger knows; the rerun resumes it
    assert pyti("farm", "status", "--ledger", str(ledger)).stdout.count("(attempt 1)") == 1


# -- real guests ----------------------------------------------------------------------------------------


def _qemu_running(vm: str) -> bool:
    found = subprocess.run(["pgrep", "-f", f"guest={vm}"], capture_output=True, check=False)
    return found.returncode == 0


@pytest.mark.farm
@pytest.mark.qemu
def test_a_worker_killed_mid_job_every_job_done_exactly_once_and_a_rerun_does_nothing(
    tmp_path: Path, wheels: Path, cluster: Cluster
) -> None:
    if not HAVE_QEMU:
        pytest.skip("needs qemu-system-x86_64 and /dev/fuse")
    GuestSystem.default()  # built (or found) once, before the workers look for it
    cluster.scheduler()
    workers = {}
    for name in ("w1", "w2"):
        proc, address = cluster.worker(name, "--work-dir", str(tmp_path / name))
        workers[address] = (name, proc)
    ledger = tmp_path / "farm.sqlite"
    argv = [
        "farm", "run", *map(str, sorted(wheels.glob("*.whl"))), "--ledger", str(ledger),
        "--scheduler", cluster.address, "--recipe", "install-only", "--timeout", "400",
        "--find-links", str(wheels), "--no-index", "--plain", "--report", str(tmp_path / "reports"),
    ]  # fmt: skip
    submitter = cluster.start("submitter", [str(BIN / "pyti"), *argv])
    # the first job whose guest runs its tasks: kill its worker's whole process group (the host is lost)
    tasks = submitter.wait_for(r"tasks: (\S+) \[default\]: running the tasks", timeout=300)
    label = tasks.group(1)
    started = re.findall(rf"started: {re.escape(label)} \[default\]: on worker (\S+)", submitter.text())
    booted = re.findall(rf"boot: {re.escape(label)} \[default\]: starting VM (\S+)", submitter.text())
    victim_name, victim = workers[started[-1]]
    victim.kill_group(signal.SIGKILL)
    t_kill = time.monotonic()
    assert submitter.popen.wait(timeout=600) == 0, submitter.text()[-5000:]
    out = submitter.text()
    assert "3 of 3 job(s) passed" in out
    with Ledger(ledger) as book:
        rows = {Path(r.spec).name: r for r in book.rows()}
    assert len(rows) == 3
    assert all(r.state == "done" and r.ok for r in rows.values())
    assert rows[Path(label).name].attempts == 2  # it ran again, on the other worker
    assert rows[Path(label).name].worker != started[-1]
    assert sorted(r.attempts for r in rows.values()) == [1, 1, 2]
    assert len(list((tmp_path / "reports").glob("*.json"))) == 3
    # what the killed worker left (its guest, if QEMU outlived it) goes when a worker takes its slot
    survived = _qemu_running(booted[-1])
    again_proc, _ = cluster.worker("w1-again", "--work-dir", str(tmp_path / victim_name))
    assert not _qemu_running(booted[-1])
    if survived:
        assert f"destroying {booted[-1]}, left by a job that did not finish" in again_proc.text()
    assert not any((tmp_path / victim_name).glob("slot-*/jobs/*"))
    # the same command again does no work
    t0 = time.monotonic()
    again = pyti(*argv)
    assert again.returncode == 0, again.stderr
    assert "started:" not in again.stderr
    assert "done already" in again.stderr
    assert "3 of 3 job(s) passed" in again.stdout
    with Ledger(ledger) as book:
        assert sorted(r.attempts for r in book.rows()) == [1, 1, 2]
    rerun = time.monotonic() - t0
    print(f"QEMU outlived its worker: {survived}; kill -> done in {t0 - t_kill:.1f} s; rerun {rerun:.1f} s")


@pytest.mark.farm
def test_tls_with_mutual_authentication_and_strangers_refused(
    tmp_path: Path, wheels: Path, cluster: Cluster
) -> None:
    import dask

    certs = make_ca_and_certs(tmp_path / "tls", ["scheduler", "worker", "client"])
    stranger = make_ca_and_certs(tmp_path / "stranger", ["client"])  # another CA signed this one
    ca = str(certs["ca"][0])

    def tls(name: str, pki: dict[str, tuple[Path, Path]] = certs) -> list[str]:
        return [
            "--tls-ca-file",
            str(pki["ca"][0]),
            "--tls-cert",
            str(pki[name][0]),
            "--tls-key",
            str(pki[name][1]),
        ]

    cluster.scheduler(
        *tls("scheduler"), protocol="tls", env={"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "1"}
    )
    assert cluster.address.startswith("tls://127.0.0.1:")
    _, worker = cluster.worker(
        "w1", "--uri", "test:///default", "--work-dir", str(tmp_path / "w1"), *tls("worker")
    )
    assert worker.startswith("tls://127.0.0.1:")
    guest = fake_guest(tmp_path / "guest", boot_timeout=1)
    wheel = wheels / "farma-1.0-py3-none-any.whl"

    def farm(security: Security | None, address: str = cluster.address) -> list[RunResult]:
        return list(
            run_many([wheel], ledger=tmp_path / "farm.sqlite", scheduler=address, security=security,
                     guest=guest, recipe="install-only", find_links=[wheels], no_index=True)
        )  # fmt: skip

    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        # no certificate, a certificate of another CA, plain TCP: all refused before any job is sent
        for security in (None, security_from_files(stranger["ca"][0], *stranger["client"])):
            with pytest.raises(SchedulerLostError, match="cannot reach the Dask scheduler"):
                farm(security)
        client_of_stranger = security_from_files(ca, *stranger["client"])  # trusts us, we do not trust it
        with pytest.raises(SchedulerLostError, match="cannot reach the Dask scheduler"):
            farm(client_of_stranger)
        with pytest.raises(SchedulerLostError, match="cannot reach the Dask scheduler"):
            farm(None, cluster.address.replace("tls://", "tcp://"))
    with Ledger(tmp_path / "farm.sqlite") as book:
        assert [r.attempts for r in book.rows()] == [0]
    # a worker with a stranger's certificate cannot join
    rogue = cluster.start(
        "rogue",
        [str(BIN / "pyti"), "farm", "worker", cluster.address, "--uri", "test:///default",
         "--work-dir", str(tmp_path / "rogue"), *tls("client", stranger)],
        {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "3s"},
    )  # fmt: skip
    assert rogue.popen.wait(timeout=120) == 3
    assert "pyti: error: cannot join the Dask scheduler" in rogue.text()
    # the farm's own parties get through, over TLS
    (result,) = farm(security_from_files(ca, *certs["client"]))
    assert "PYTI-GUEST-READY" in result.report.records[0].stderr  # it ran on the worker (no real guest)
    with Ledger(tmp_path / "farm.sqlite") as book:
        (row,) = book.rows()
    assert (row.state, row.attempts, row.worker) == ("done", 1, worker)


@pytest.mark.farm
@pytest.mark.qemu
def test_the_notebook_in_docs_runs(tmp_path: Path, wheels: Path) -> None:
    """docs/farm.ipynb, executed as a user would (a Jupyter kernel), on a local wheel and a real guest."""
    if not HAVE_QEMU:
        pytest.skip("needs qemu-system-x86_64 and /dev/fuse")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    GuestSystem.default()
    notebook = nbformat.read(Path(__file__).parents[2] / "docs" / "farm.ipynb", as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", ())]
    wheel = wheels / "farma-1.0-py3-none-any.whl"
    parameters.source = (
        f"specs = [{str(wheel)!r}]\nrecipe = 'install-only'\nledger = 'farm-demo.sqlite'\n"
        f"run_options = {{'max_vms': 1, 'find_links': [{str(wheels)!r}], 'no_index': True, "
        f"'work_dir': {str(tmp_path / 'work')!r}}}\n"
    )
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "\n".join(
        str(output.get("text", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert "farma==1.0: passed" in text
    assert "1 result(s) from the ledger" in text
    assert "{'pending': 0, 'running': 0, 'done': 1, 'failed': 0}" in text
    assert (tmp_path / "farm-demo.sqlite").is_file()
