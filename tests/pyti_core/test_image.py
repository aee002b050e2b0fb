"""pyti image prepare: the agent and its boot hook land in a disk image (systemd and SysV guests).

The disks are made in the test with diskhandler's ``create_io_disk`` from folder trees that look like
root filesystems; what was written is read back with e2fsprogs' ``debugfs`` (a tool that knows nothing
of pyti or diskhandler), and the hook itself is checked with ``sh -n`` and run under a real TCG guest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from diskhandler import DiskOperations, create_io_disk
from pyti_core.errors import GuestImageError, ImagePrepareError, PytiError
from pyti_core.guest import agent
from pyti_core.image import (
    IO_LABEL,
    detect_init,
    hook_script,
    prepare_image,
    systemd_unit,
    sysv_script,
)

MiB = 1 << 20
needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("debugfs", "mke2fs", "fuse2fs")) or not os.path.exists("/dev/fuse"),
    reason="needs e2fsprogs (debugfs, mke2fs), fuse2fs and /dev/fuse",
)


def _rootfs(top: Path, *, systemd: bool, merged_usr: bool = False, python: bool = True) -> Path:
    """A folder that looks enough like a Linux root filesystem."""
    for d in ("etc", "usr/bin", "usr/lib", "var", "tmp"):
        (top / d).mkdir(parents=True, exist_ok=True)
    if merged_usr:
        (top / "bin").symlink_to("usr/bin")
        (top / "lib").symlink_to("usr/lib")
    else:
        (top / "bin").mkdir()
        (top / "lib").mkdir()
    if python:
        (top / "usr/bin/python3.11").write_bytes(b"\x7fELF fake")
        (top / "usr/bin/python3").symlink_to("python3.11")
    if systemd:
        where = top / ("usr/lib" if merged_usr else "lib") / "systemd"
        where.mkdir(parents=True)
        (where / "systemd").write_bytes(b"\x7fELF fake")
        (top / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    else:
        (top / "etc/init.d").mkdir()
        for level in "0123456S":
            (top / f"etc/rc{level}.d").mkdir()
        (top / "etc/init.d/rcS").write_text("#!/bin/sh\n")
    (top / "etc/hostname").write_text("guest\n")
    return top


def _disk(tmp_path: Path, tree: Path, fmt: str = "raw", table: str | None = None) -> Path:
    suffix = {"raw": "img", "qcow2": "qcow2", "vdi": "vdi"}[fmt]
    return create_io_disk(tmp_path / f"root.{suffix}", 64 * MiB, fmt, "ext4", tree, partition_table=table)


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True, timeout=60
    )
    return proc.stdout


def dump(image: Path, guest: str, out: Path) -> bytes:
    debugfs(image, f"dump {guest} {out}")
    return out.read_bytes()


def inode(image: Path, guest: str) -> dict[str, str]:
    """Mode, owner and (for a fast symlink) the target of a guest path, from ``debugfs stat``."""
    text = debugfs(image, f"stat {guest}")
    mode = re.search(r"Mode:\s+(\d+)", text)
    user = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", text)
    kind = re.search(r"Type:\s+(\w+)", text)
    link = re.search(r'Fast link dest:\s+"([^"]*)"', text)
    assert mode, text
    assert user, text
    assert kind, text
    return {
        "mode": mode.group(1),
        "uid": user.group(1),
        "gid": user.group(2),
        "type": kind.group(1),
        "link": link.group(1) if link else "",
    }


# -- the texts -----------------------------------------------------------------------------------


def test_hook_script_is_valid_sh_and_names_label_and_mount_point(tmp_path: Path) -> None:
    script = tmp_path / "run-agent"
    script.write_text(hook_script(label="MY-IO", mount_point="/srv/io"))
    subprocess.run(["sh", "-n", str(script)], check=True)
    subprocess.run(["busybox", "sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "LABEL='MY-IO'" in text
    assert "MNT='/srv/io'" in text
    sysv = tmp_path / "pyti-agent"
    sysv.write_text(sysv_script())
    subprocess.run(["sh", "-n", str(sysv)], check=True)


def test_sysv_script_only_acts_on_start(tmp_path: Path) -> None:
    script = tmp_path / "pyti-agent"
    script.write_text(sysv_script())
    script.chmod(0o755)
    for action in ("stop", "status", "restart"):
        assert subprocess.run([str(script), action], check=False, capture_output=True).returncode == 0
    bad = subprocess.run([str(script), "frobnicate"], check=False, capture_output=True, text=True)
    assert bad.returncode == 3
    assert "Usage" in bad.stderr


def test_hook_refuses_words_that_would_break_the_shell() -> None:
    with pytest.raises(ValueError, match="label"):
        hook_script(label="x'; reboot; '")
    with pytest.raises(ValueError, match="mount_point"):
        hook_script(mount_point="relative/dir")


def test_unit_runs_the_hook_once_for_multi_user() -> None:
    unit = systemd_unit()
    assert "Type=oneshot" in unit
    assert "WantedBy=multi-user.target" in unit
    assert "ExecStart=/opt/pyti/run-agent" in unit


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify: no unknown key, bad value or missing command (it warns on stderr)."""
    hook = tmp_path / "run-agent"
    hook.write_text(hook_script())
    hook.chmod(0o755)
    unit = tmp_path / "pyti-agent.service"
    unit.write_text(systemd_unit().replace("/opt/pyti/run-agent", str(hook)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Type=oneshot", "Type=oneshot\nTypo=1"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", str(broken)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert "Unknown key" in proc.stderr  # the check above can fail


def test_detect_init() -> None:
    assert detect_init({"/usr/lib/systemd/systemd", "/etc/init.d"}.__contains__) == "systemd"
    assert detect_init({"/etc/init.d"}.__contains__) == "sysv"
    assert detect_init({"/etc/rc.d/init.d"}.__contains__) == "sysv"
    assert detect_init(set[str]().__contains__) is None


# -- into real disk images -----------------------------------------------------------------------


@needs_tools
def test_prepare_systemd_guest(tmp_path: Path) -> None:
    image = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=True))
    prepared = prepare_image(image)
    assert prepared.init == "systemd"
    assert prepared.python == "/usr/bin/python3"
    assert set(prepared.files) == {
        "/opt/pyti/agent.py",
        "/opt/pyti/run-agent",
        "/etc/systemd/system/pyti-agent.service",
        "/etc/systemd/system/multi-user.target.wants/pyti-agent.service",
    }
    assert dump(image, "/opt/pyti/agent.py", tmp_path / "a") == Path(agent.__file__).read_bytes()
    assert dump(image, "/opt/pyti/run-agent", tmp_path / "b").decode() == hook_script()
    assert dump(image, "/etc/systemd/system/pyti-agent.service", tmp_path / "c").decode() == systemd_unit()
    hook = inode(image, "/opt/pyti/run-agent")
    assert (hook["mode"], hook["uid"], hook["gid"]) == ("0755", "0", "0")
    assert inode(image, "/etc/systemd/system/pyti-agent.service")["mode"] == "0644"
    wants = inode(image, "/etc/systemd/system/multi-user.target.wants/pyti-agent.service")
    assert wants["type"] == "symlink"
    assert wants["link"] == "/etc/systemd/system/pyti-agent.service"
    assert "pyti-agent" not in debugfs(image, "ls /etc/init.d")  # no SysV script on a systemd guest
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)


@needs_tools
def test_prepare_sysv_guest(tmp_path: Path) -> None:
    image = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=False))
    prepared = prepare_image(image)
    assert prepared.init == "sysv"
    assert dump(image, "/etc/init.d/pyti-agent", tmp_path / "s").decode() == sysv_script()
    assert inode(image, "/etc/init.d/pyti-agent")["mode"] == "0755"
    for level in "2345":
        link = inode(image, f"/etc/rc{level}.d/S99pyti-agent")
        assert (link["type"], link["link"]) == ("symlink", "../init.d/pyti-agent")
    for level in "016S":
        assert "pyti-agent" not in debugfs(image, f"ls /etc/rc{level}.d")
    assert "systemd" not in debugfs(image, "ls /etc")
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)


@needs_tools
def test_prepare_merged_usr_systemd_guest_in_a_partitioned_qcow2(tmp_path: Path) -> None:
    """/lib -> usr/lib: systemd is found through the guest's own symlink; a second run is harmless."""
    image = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=True, merged_usr=True), "qcow2", "mbr")
    assert prepare_image(image).init == "systemd"
    again = prepare_image(image)
    assert again.init == "systemd"
    with DiskOperations(image, readonly=True) as ops:
        assert ops.listdir("/opt/pyti") == ["agent.py", "run-agent"]
        assert ops.listdir("/etc/systemd/system/multi-user.target.wants") == ["pyti-agent.service"]
        st = ops.stat("/etc/systemd/system/multi-user.target.wants/pyti-agent.service", follow_symlinks=False)
        assert stat.S_ISLNK(st.st_mode)
        ops.get_file("/opt/pyti/run-agent", tmp_path / "hook")
    assert (tmp_path / "hook").read_text() == hook_script()
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)


@needs_tools
def test_prepare_a_gpt_vdi_and_an_rc_d_layout(tmp_path: Path) -> None:
    """SysV scripts under /etc/rc.d (no /etc/init.d), in a VDI with a GPT."""
    tree = _rootfs(tmp_path / "tree", systemd=False)
    shutil.rmtree(tree / "etc/init.d")
    (tree / "etc/rc.d/init.d").mkdir(parents=True)
    for level in "0123456":
        (tree / f"etc/rc{level}.d").rmdir()
        (tree / f"etc/rc.d/rc{level}.d").mkdir()
    image = _disk(tmp_path, tree, "vdi", "gpt")
    prepared = prepare_image(image)
    assert prepared.init == "sysv"
    assert "/etc/rc.d/init.d/pyti-agent" in prepared.files
    with DiskOperations(image, readonly=True) as ops:
        assert ops.listdir("/etc/rc.d/rc3.d") == ["S99pyti-agent"]
        assert ops.listdir("/etc/rc.d/rc0.d") == []
        assert not ops.exists("/etc/init.d")
        ops.get_file("/etc/rc.d/rc5.d/S99pyti-agent", tmp_path / "via-link")  # the link resolves
    assert (tmp_path / "via-link").read_text() == sysv_script()
    subprocess.run(["qemu-img", "check", str(image)], check=True, capture_output=True)


@needs_tools
def test_forcing_sysv_on_a_systemd_guest(tmp_path: Path) -> None:
    tree = _rootfs(tmp_path / "tree", systemd=True)
    (tree / "etc/init.d").mkdir()
    image = _disk(tmp_path, tree)
    assert prepare_image(image, init="sysv").init == "sysv"
    assert inode(image, "/etc/rc3.d/S99pyti-agent")["link"] == "../init.d/pyti-agent"  # rc3.d created
    assert "pyti-agent" not in debugfs(image, "ls /etc/systemd/system")


@needs_tools
def test_no_init_system_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    tree = _rootfs(tmp_path / "tree", systemd=False)
    shutil.rmtree(tree / "etc/init.d")
    image = _disk(tmp_path, tree)
    with pytest.raises(ImagePrepareError, match=r"neither systemd .* nor SysV") as info:
        prepare_image(image)
    assert info.value.image == image
    assert str(image) in str(info.value)
    assert isinstance(info.value, GuestImageError)
    assert isinstance(info.value, PytiError)
    assert "opt" not in debugfs(image, "ls /").split()


@needs_tools
def test_no_python_is_refused_unless_asked(tmp_path: Path) -> None:
    image = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=True, python=False))
    with pytest.raises(ImagePrepareError, match="no python3 in the guest"):
        prepare_image(image)
    prepared = prepare_image(image, require_python=False)
    assert prepared.python is None
    assert "/opt/pyti/run-agent" in prepared.files


@needs_tools
def test_a_data_disk_is_not_a_root_filesystem(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "file.txt").write_text("x")
    image = create_io_disk(tmp_path / "data.img", 16 * MiB, "raw", "ext4", data, partition_table=None)
    with pytest.raises(ImagePrepareError, match="not a Linux root filesystem"):
        prepare_image(image)


def test_missing_image_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        prepare_image(tmp_path / "nope.qcow2")


def test_label_is_what_io_disks_carry() -> None:
    assert IO_LABEL == "pyti-io"
    assert len(IO_LABEL) <= 11


# -- the hook in a real guest ----------------------------------------------------------------------


@pytest.mark.qemu
@needs_tools
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
def test_the_hook_finds_the_io_disk_runs_the_job_and_powers_off(tmp_path: Path) -> None:
    """A prepared root disk (vda) and an IO disk (vdb1, as pyti makes them) in the tiny Python guest.

    The guest's init runs the installed hook from the root disk, as a boot hook would; it must find
    the IO disk by itself, run the job through the IO disk's ``run.sh``, leave the records there, and
    power the guest off.
    """
    from pyti_core.guest.tinylinux import build_tiny_linux
    from pyti_core.manager import GuestSystem, run_script

    root = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=False))
    prepare_image(root)
    io = tmp_path / "io"
    (io / "results").mkdir(parents=True)
    (io / "work").mkdir()
    shutil.copyfile(agent.__file__, io / "agent.py")
    code = "import os; print(sorted(os.listdir('/sys/class/net')))"
    job = {
        "distribution": "hook-test",
        "tasks": [{"id": "1", "name": "net", "argv": ["python3", "-c", code], "timeout": 60}],
    }
    (io / "job.json").write_text(json.dumps(job))
    guest = GuestSystem.default()
    (io / "run.sh").write_text(run_script(guest))
    io_disk = create_io_disk(tmp_path / "io.img", 32 * MiB, "raw", "ext4", io, label=IO_LABEL)
    tiny = build_tiny_linux(python=True)
    cmdline = f"{tiny.cmdline} pyti.disk=/dev/vda pyti.run=/mnt/disk/opt/pyti/run-agent"
    proc = subprocess.run(
        [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(tiny.kernel), "-initrd", str(tiny.initrd), "-append", cmdline,
            "-drive", f"file={root},format=raw,if=virtio", "-drive", f"file={io_disk},format=raw,if=virtio",
        ],
        capture_output=True, text=True, errors="replace", timeout=180, check=False,
    )  # fmt: skip
    serial = proc.stdout
    assert "pyti: running the job on /dev/vdb1 (/mnt/disk)" in serial, serial[-3000:]
    assert "PYTI-RUN-EXIT 0" in serial, serial[-3000:]
    with DiskOperations(io_disk, readonly=True) as ops:
        ops.get_file("/results/records.jsonl", tmp_path / "records.jsonl")
    (rec,) = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert rec["params"]["status"] == "passed"
    assert rec["params"]["stdout"].strip() == "['lo']"
