"""pyti_core.manager without booting a guest: records read back from a real IO disk, the way missing and
rejected records are reported, the guest's run script, and the choice of the hypervisor URI."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyti_core import manager
from pyti_core.errors import ConfigError, GuestBootError, GuestRunError, PytiError, TaskError
from pyti_core.manager import GuestSystem, RunResult, hypervisor_uri, run, run_prepared, run_script
from pyti_core.packages import bundled_pip_wheel, prepare_distribution
from pyti_core.rawdata import MAX_RECORD_BYTES, Report
from pyti_core.tasks import RECIPES, GuestLayout
from tests.pyti_core.test_packages import make_wheel, tiny_pair

JOB_TASKS: list[dict[str, Any]] = [
    {"id": "1", "name": "install", "stop_on_failure": True},
    {"id": "2", "name": "import", "stop_on_failure": False},
    {"id": "3", "name": "pytest", "stop_on_failure": False},
]

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fuse2fs") is None, reason="needs /dev/fuse and fuse2fs"
)


def record(task_id: str, task: str, status: str = "passed", **extra: Any) -> dict[str, Any]:
    params = {
        "task_id": task_id,
        "task": task,
        "status": status,
        "exit_code": 0 if status == "passed" else 1,
        "stdout": "out",
        "stderr": "",
        "started_at": "2026-11-27T07:00:00.5Z",
        "duration_s": 1.5,
        "max_rss_kb": 20000,
        "cpu_user_s": 1.0,
        "cpu_system_s": 0.1,
        **extra,
    }
    return {"jsonrpc": "2.0", "method": "rawdata.report", "params": params}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def collect(path: Path, *, timed_out: bool = False, exited: bool = True) -> list[Any]:
    return manager._collect_records(
        path,
        JOB_TASKS,
        timed_out=timed_out,
        exited=exited,
        job_timeout=60.0,
        serial="boot\nPYTI-RUN-EXIT 1\n",
    )


# -- records: valid, rejected, missing ----------------------------------------------------------------


def test_all_records_valid(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(
        line(record("1", "install"))
        + b"\n"  # blank lines are fine
        + line(record("2", "import"))
        + line(record("3", "pytest", "failed", tests={"passed": 1, "failed": 1}))
    )
    records = collect(path)
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "passed"),
        ("pytest", "failed"),
    ]
    assert records[2].tests is not None
    assert records[2].tests.failed == 1
    assert records[0].max_rss_kb == 20000
    assert records[0].duration_s == 1.5


def test_records_come_back_in_job_order(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(record("3", "pytest")) + line(record("1", "install")) + line(record("2", "import")))
    assert [r.task for r in collect(path)] == ["install", "import", "pytest"]


def test_malformed_non_json_and_foreign_records_are_rejected_and_their_tasks_reported(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    bad_schema = record("2", "import")
    bad_schema["params"]["max_rss_kb"] = "lots"
    path.write_bytes(
        line(record("1", "install"))
        + line(bad_schema)  # claims task 2, breaks the schema
        + b'{"task_id": "3", not json at all\n'  # claims task 3, not JSON
        + line(record("9", "nope"))  # a task the job does not have
        + line(record("1", "install", "failed"))  # a second record for task 1
        + b"\xff\xfe\x00garbage\n"
    )
    records = collect(path)
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "error"),
        ("pytest", "error"),
    ]
    assert records[0].stdout == "out"  # the first record of task 1 stands
    assert "rejected" in records[1].stderr
    assert "params.max_rss_kb must be int" in records[1].stderr
    assert "rejected" in records[2].stderr
    assert "not JSON" in records[2].stderr
    for made_up in records[1:]:
        assert made_up.exit_code is None
        assert made_up.duration_s == 0.0
        assert made_up.max_rss_kb == 0
        assert "task id '9' is not in the job" in made_up.stderr
        assert "a second record for task '1'" in made_up.stderr


def test_a_record_under_the_wrong_task_name_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(record("1", "install")) + line(record("2", "pytest")) + line(record("3", "pytest")))
    records = collect(path)
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "error"),
        ("pytest", "passed"),
    ]
    assert "named 'import' in the job, not 'pytest'" in records[1].stderr


def test_an_oversized_line_is_skipped_without_reading_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    huge = record("2", "import", stdout="x" * (MAX_RECORD_BYTES + 10))
    path.write_bytes(line(record("1", "install")) + line(huge) + line(record("3", "pytest")))
    records = collect(path)
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "error"),
        ("pytest", "passed"),
    ]
    assert f"line 2: longer than the {MAX_RECORD_BYTES}-byte record limit" in records[1].stderr


def test_an_enormous_records_file_is_read_only_up_to_its_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager, "_MAX_RECORDS_FILE", 4096)
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(record("1", "install")) + b"\n" * 10_000 + line(record("2", "import")))
    records = collect(path)
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "error"),
        ("pytest", "error"),
    ]


def test_a_failed_stop_on_failure_task_ends_the_job_without_made_up_records(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(record("1", "install", "failed")))
    assert [(r.task, r.status) for r in collect(path)] == [("install", "failed")]


def test_missing_records_after_a_job_timeout_are_timeouts(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(line(record("1", "install")))
    stopped = datetime.datetime(2026, 11, 27, 7, 0, 12, tzinfo=datetime.UTC)
    records = manager._collect_records(
        path, JOB_TASKS, timed_out=True, exited=False, job_timeout=60.0, serial="",
        ready_at=stopped - datetime.timedelta(seconds=30), stopped_at=stopped,
    )  # fmt: skip
    # the install record started at 07:00:00.5 and took 1.5 s: import ran from 07:00:02 until the stop
    assert records[1].started_at == stopped - datetime.timedelta(seconds=10)
    assert records[1].duration_s == 10.0
    assert records[2].duration_s == 0.0
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "timeout"),
        ("pytest", "timeout"),
    ]
    assert "60 s timeout ran out while this task ran" in records[1].stderr
    assert "60 s timeout ran out before this task started" in records[2].stderr


def test_missing_records_of_a_guest_that_stopped_early_are_errors_with_its_console(tmp_path: Path) -> None:
    records = collect(tmp_path / "no-such-file.jsonl", exited=False)
    assert [r.status for r in records] == ["error"] * 3
    assert "without the agent's end marker" in records[0].stderr
    assert "PYTI-RUN-EXIT 1" in records[0].stderr


def test_a_records_folder_instead_of_a_file_means_no_records(tmp_path: Path) -> None:
    (tmp_path / "records.jsonl").mkdir()
    assert [r.status for r in collect(tmp_path / "records.jsonl")] == ["error"] * 3


def test_run_result_ok_needs_records_that_all_passed() -> None:
    assert not RunResult("x==1", Report("x==1", ()), {}, "").ok


# -- the host-side read-back from a real IO disk ---------------------------------------------------------


def _io_disk(
    tmp_path: Path, results: dict[str, bytes | str], *, symlinks: dict[str, str] | None = None
) -> Path:
    from diskhandler import create_io_disk

    folder = tmp_path / "io"
    (folder / "results").mkdir(parents=True)
    for name, data in results.items():
        target = folder / "results" / name
        target.write_bytes(data.encode() if isinstance(data, str) else data)
    for name, target_path in (symlinks or {}).items():
        os.symlink(target_path, folder / "results" / name)
    disk = tmp_path / "io.img"
    create_io_disk(disk, 64 << 20, format="raw", filesystem="ext2", files=folder)
    return disk


@needs_fuse
@pytest.mark.fuse
def test_records_are_read_back_from_the_io_disk_and_validated(tmp_path: Path) -> None:
    data = line(record("1", "install")) + b"not json\n" + line(record("3", "pytest"))
    disk = _io_disk(tmp_path, {"records.jsonl": data, "junit-3.xml": "<testsuite tests='1'/>"})
    dest = tmp_path / "back"
    manager._download_results(disk, GuestLayout(), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["junit-3.xml", "records.jsonl"]
    assert (dest / "records.jsonl").read_bytes() == data
    records = collect(dest / "records.jsonl")
    assert [(r.task, r.status) for r in records] == [
        ("install", "passed"),
        ("import", "error"),
        ("pytest", "passed"),
    ]
    assert "line 2: record 1: record is not JSON" in records[1].stderr


@needs_fuse
@pytest.mark.fuse
def test_a_records_symlink_out_of_the_disk_is_not_followed(tmp_path: Path) -> None:
    canary = tmp_path / "host-secret.jsonl"
    canary.write_bytes(line(record("1", "install")))
    disk = _io_disk(tmp_path, {}, symlinks={"records.jsonl": str(canary)})
    dest = tmp_path / "back"
    manager._download_results(disk, GuestLayout(), dest)
    assert not (dest / "records.jsonl").exists()
    assert [r.status for r in collect(dest / "records.jsonl")] == ["error"] * 3


def test_an_io_disk_too_small_for_its_files_is_a_run_error(tmp_path: Path) -> None:
    folder = tmp_path / "io"
    folder.mkdir()
    (folder / "big.bin").write_bytes(os.urandom(3 << 20))
    with pytest.raises(GuestRunError, match="cannot create the IO disk"):
        manager._create_io_disk(tmp_path / "io.img", 1 << 20, folder)
    assert not (tmp_path / "io.img").exists()


def test_io_disk_size_grows_with_the_files(tmp_path: Path) -> None:
    assert manager._io_disk_size(tmp_path) == manager._IO_DISK_MIN
    (tmp_path / "w.whl").write_bytes(bytes(40 << 20))
    size = manager._io_disk_size(tmp_path)
    assert size >= 2 * (40 << 20)
    assert size % (1 << 20) == 0


# -- the guest system and its run script ----------------------------------------------------------------


def test_guest_system_run_cmdline_and_script(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    tiny = GuestSystem(kernel=kernel, initrd=tmp_path / "initrd")
    assert tiny.io_device == "/dev/vda"
    assert tiny.run_cmdline().endswith(" pyti.disk=/dev/vda1,/dev/vda pyti.run=/mnt/disk/run.sh")
    script = run_script(tiny)
    assert "python3 /mnt/disk/agent.py /mnt/disk\n" in script
    assert "/mnt/system" not in script
    assert script.startswith("#!/bin/sh\n")
    assert script.endswith('exit "$status"\n')
    with_disk = GuestSystem(kernel=kernel, system_disk=tmp_path / "system.qcow2")
    assert with_disk.io_device == "/dev/vdb"
    assert "pyti.disk=/dev/vdb1,/dev/vdb " in with_disk.run_cmdline()
    assert "mount /dev/vda1 /mnt/system" in run_script(with_disk)
    # the script is valid sh
    (tmp_path / "run.sh").write_text(run_script(with_disk))
    subprocess.run(["sh", "-n", str(tmp_path / "run.sh")], check=True)


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) is needed")
def test_system_disk_format_is_stated_to_vmanager(tmp_path: Path) -> None:
    """A user's qcow2 over a base image is defined (never booted here): pyti states its format."""
    pytest.importorskip("libvirt")
    base = tmp_path / "base.vmdk"
    system = tmp_path / "system.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(base), "8M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "vmdk", str(system)], check=True
    )
    assert manager._system_disk_format(system) == "qcow2"
    assert manager._system_disk_format(base) == "vmdk"
    assert manager._system_disk_format(None) is None
    guest = GuestSystem(system_disk=system)
    (tmp_path / "io.img").write_bytes(bytes(1 << 20))
    vm = manager._define_vm(
        guest, "sysfmt", None, tmp_path / "io.img", tmp_path / "serial.log"
    )  # embedded QEMU
    try:
        assert vm.config.hd_format == "qcow2"
    finally:
        vm.undefine()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({}, "guest"),
        ({"initrd": "i", "system_disk": "s"}, "guest.initrd"),
        ({"kernel": "k", "boot_timeout": 0}, "guest.boot_timeout"),
        ({"kernel": "k", "memory": 16}, "guest"),
    ],
)
def test_guest_system_refuses_what_cannot_boot(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        GuestSystem(**kwargs)
    assert info.value.key == key


def test_bad_arguments_fail_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="unknown recipe"):
        run("x==1", recipe="no-such-recipe", work_dir=tmp_path)
    with pytest.raises(ConfigError, match="timeout"):
        run("x==1", timeout=0, work_dir=tmp_path)
    guest = GuestSystem(kernel=tmp_path / "k")
    with pytest.raises(ConfigError, match="timeout"):
        run_prepared(None, None, guest=guest, timeout=-1, work_dir=tmp_path, uri=None, progress=None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_errors_carry_the_serial_log() -> None:
    log = "".join(f"line {i}\n" for i in range(100))
    error = GuestBootError("VM x: no marker", vm="x", serial_log=log, timeout=5.0)
    assert isinstance(error, GuestRunError)
    assert isinstance(error, TimeoutError)
    assert isinstance(error, PytiError)
    assert error.serial_log == log
    assert error.vm == "x"
    assert error.timeout == 5.0
    text = str(error)
    assert text.startswith("VM x: no marker\n--- serial console (last lines) ---\n")
    assert "line 99" in text
    assert "line 59" not in text
    assert str(GuestBootError("no log")) == "no log"


# -- the hypervisor URI ------------------------------------------------------------------------------------


def test_an_explicit_uri_is_used_as_is() -> None:
    assert hypervisor_uri("test:///default") == "test:///default"


def test_the_default_uri_is_vmanagers() -> None:
    import vmanager

    assert hypervisor_uri() == vmanager.default_uri()
    assert hypervisor_uri().startswith("qemu:///embed?root=")


def test_a_vm_that_cannot_be_defined_is_a_run_error_naming_the_file(tmp_path: Path) -> None:
    wheel = bundled_pip_wheel()
    if wheel is None:
        pytest.skip("this Python has no bundled pip wheel")
    main, dep = tiny_pair(tmp_path / "projects")
    make_wheel(dep, tmp_path / "index")
    dist = prepare_distribution(
        main, tmp_path / "dist", requirements=(), no_index=True, find_links=[tmp_path / "index"],
        pip_wheel=wheel, build_isolation=False,
    )  # fmt: skip
    missing = tmp_path / "no-such-vmlinuz"
    guest = GuestSystem(kernel=missing, initrd=tmp_path / "no-such-initrd")
    seen: list[str] = []
    with pytest.raises(GuestRunError, match="cannot define VM pyti-pytiny-") as info:
        run_prepared(
            dist, RECIPES["install-only"], guest=guest, timeout=60, work_dir=tmp_path / "run", uri=None,
            progress=lambda phase, _message: seen.append(phase),
        )  # fmt: skip
    assert str(missing) in str(info.value)
    assert isinstance(info.value.__cause__, FileNotFoundError)  # vmanager's DiskNotFoundError, chained
    assert seen[0] == "io-disk"
    assert (tmp_path / "run" / "io.img").is_file()  # made before the VM; the caller owns work_dir
