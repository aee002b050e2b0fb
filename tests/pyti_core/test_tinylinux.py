"""The tiny Linux guest builder: its cpio writer, module resolver and cache, and real TCG boots."""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs
import pytest

from pyti_core.guest import tinylinux
from pyti_core.guest.tinylinux import (
    READY_MARKER,
    RUN_EXIT_MARKER,
    CpioArchive,
    CpioEntryError,
    GuestImageError,
    TinyLinux,
    build_tiny_linux,
    default_cache_dir,
    module_dependencies,
)
from pyti_core.manager import GuestSystem

HAVE_APT = all(shutil.which(t) for t in ("apt-get", "apt-cache", "dpkg-deb"))
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None
needs_apt = pytest.mark.skipif(not HAVE_APT, reason="building the guest needs apt-get and dpkg-deb")
needs_qemu = pytest.mark.skipif(not HAVE_QEMU, reason="qemu-system-x86_64 is not installed")
BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine; a normal boot takes about 5 s
AGENT = Path(tinylinux.__file__).parent / "agent.py"


# --------------------------------------------------------------------------------------------------
# the newc writer, checked with the cpio tool
# --------------------------------------------------------------------------------------------------


def _cpio(args: list[str], archive: bytes, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        ["cpio", "--quiet", *args], input=archive, capture_output=True, cwd=cwd, check=True, timeout=60
    )
    return proc.stdout.decode()


def _archive_bytes(archive: CpioArchive, tmp_path: Path) -> bytes:
    path = tmp_path / "a.cpio"
    with open(path, "wb") as fh:
        written = archive.write(fh)
    data = path.read_bytes()
    assert written == len(data)
    return data


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_cpio_tool_reads_every_entry_kind(tmp_path: Path) -> None:
    archive = CpioArchive()
    host_file = tmp_path / "host.bin"
    host_file.write_bytes(bytes(range(256)) * 40 + b"tail")
    # names and sizes of every length mod 4 exercise the header/name/data padding
    for n in range(9):
        archive.add_file(f"data/f{'x' * n}", b"y" * n, 0o640)
    archive.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    archive.add_file("deep/er/host.bin", host_file)
    archive.add_symlink("bin/sh", "/bin/busybox")
    archive.add_directory("empty", 0o700)
    archive.add_char_device("dev/console", 5, 1)
    data = _archive_bytes(archive, tmp_path)

    listing = _cpio(["-it"], data).split()
    assert listing == archive.names()
    assert listing.index("deep") < listing.index("deep/er") < listing.index("deep/er/host.bin")

    verbose = _cpio(["-itv"], data)
    console = next(line for line in verbose.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console
    assert any(line.startswith("drwx------") and line.endswith(" empty") for line in verbose.splitlines())

    out = tmp_path / "out"
    out.mkdir()
    _cpio(["-id", "--no-absolute-filenames"], data, cwd=out)
    for n in range(9):
        assert (out / "data" / f"f{'x' * n}").read_bytes() == b"y" * n
    assert (out / "deep/er/host.bin").read_bytes() == host_file.read_bytes()
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert (out / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (out / "data/f").stat().st_mode & 0o777 == 0o640


def test_cpio_is_deterministic_and_ends_with_trailer(tmp_path: Path) -> None:
    def make() -> bytes:
        archive = CpioArchive()
        archive.add_file("a/b", b"content")
        archive.add_symlink("a/c", "b")
        return _archive_bytes(archive, tmp_path)

    first = make()
    assert first == make()
    assert len(first) % 4 == 0
    assert first.startswith(b"070701")
    assert b"TRAILER!!!\0" in first[-124:]


@pytest.mark.parametrize("name", ["", "/", "a/../b", "./a", "a/./b", "a\0b"])
def test_cpio_rejects_bad_names(name: str) -> None:
    with pytest.raises(CpioEntryError, match="relative path"):
        CpioArchive().add_file(name, b"")


def test_cpio_rejects_duplicates_and_file_parents() -> None:
    archive = CpioArchive()
    archive.add_file("etc/x", b"1")
    with pytest.raises(CpioEntryError, match="added twice"):
        archive.add_file("etc/x", b"2")
    archive.add_file("etc/x", b"3", replace=True)
    with pytest.raises(CpioEntryError, match="not one"):
        archive.add_file("etc/x/y", b"")
    archive.add_directory("etc")  # an existing directory again is fine
    assert archive.names() == ["etc", "etc/x"]
    with pytest.raises(CpioEntryError, match="target"):
        archive.add_symlink("etc/l", "")


# --------------------------------------------------------------------------------------------------
# kernel module dependencies, from synthetic ELF modules
# --------------------------------------------------------------------------------------------------


def _fake_module(modinfo: dict[str, str]) -> bytes:
    """A minimal ELF64 relocatable file with a .modinfo section, laid out like a kernel module's."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    strtab_off = info_off + len(info)
    shoff = (strtab_off + len(shstrtab) + 7) & ~7
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        1,  # ET_REL
        62,  # EM_X86_64
        1,
        0,
        0,
        shoff,
        0,
        64,
        0,
        0,
        64,
        3,
        2,
    )
    sections = (
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        + struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, info_off, len(info), 0, 0, 1, 0)
        + struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0)
    )
    body = header + info + shstrtab
    return body + bytes(shoff - len(body)) + sections


def _modules_tree(tmp_path: Path, deps: dict[str, str], *, xz: tuple[str, ...] = ()) -> Path:
    root = tmp_path / "lib/modules/6.1.0-test"
    for name, depends in deps.items():
        sub = root / "kernel" / name[0]
        sub.mkdir(parents=True, exist_ok=True)
        data = _fake_module({"license": "GPL", "depends": depends, "name": name.replace("-", "_")})
        if name in xz:
            (sub / f"{name}.ko.xz").write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ))
        else:
            (sub / f"{name}.ko").write_bytes(data)
    return root


def test_module_dependencies_come_first(tmp_path: Path) -> None:
    root = _modules_tree(
        tmp_path,
        {
            "vfat": "fat",
            "fat": "",
            "virtio_pci": "virtio,virtio_ring,virtio_pci-modern",
            "virtio": "virtio_ring",
            "virtio_ring": "",
            "virtio_pci-modern": "virtio",
        },
        xz=("virtio", "fat"),
    )
    order = [name for name, _ in module_dependencies(root, ["virtio-pci", "vfat", "fat"])]
    assert sorted(order) == sorted(set(order))
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci_modern")
    assert order.index("virtio_pci_modern") < order.index("virtio_pci")
    assert order.index("fat") < order.index("vfat")
    assert tinylinux._module_bytes(root / "kernel/f/fat.ko.xz").startswith(b"\x7fELF")


def test_module_errors_are_clear(tmp_path: Path) -> None:
    root = _modules_tree(tmp_path, {"a": "b", "b": "a", "c": "missing"})
    with pytest.raises(GuestImageError, match="dependency loop a -> b -> a"):
        module_dependencies(root, ["a"])
    with pytest.raises(GuestImageError, match="no kernel module named 'missing' \\(needed by c\\)"):
        module_dependencies(root, ["c"])
    (root / "kernel/d").mkdir()
    (root / "kernel/d/d.ko").write_bytes(b"\x7fELF" + bytes(20))
    with pytest.raises(GuestImageError, match=r"d\.ko: not a usable x86-64 kernel module"):
        module_dependencies(root, ["d"])
    (root / "kernel/d/d.ko").write_bytes(_fake_module({"depends": ""})[:200])
    with pytest.raises(GuestImageError, match="beyond the end"):
        module_dependencies(root, ["d"])
    (root / "kernel/d/e.ko.xz").write_bytes(b"not xz")
    with pytest.raises(GuestImageError, match="cannot decompress"):
        module_dependencies(root, ["e"])
    with pytest.raises(GuestImageError, match="no kernel modules found"):
        module_dependencies(tmp_path / "empty", ["a"])


def test_cmdline_with_run() -> None:
    guest = TinyLinux(kernel=Path("k"), initrd=Path("i"))
    assert guest.cmdline_with(run="/mnt/disk/run.sh", extra=["pyti.echo=0"]) == (
        "console=ttyS0 panic=-1 quiet no_timer_check pyti.run=/mnt/disk/run.sh pyti.echo=0"
    )
    with pytest.raises(ValueError, match="whitespace"):
        guest.cmdline_with(run="/a b")


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "pyti" / "guest"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pyti" / "guest"


def test_missing_apt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on it
    with pytest.raises(GuestImageError, match="apt-get not found"):
        build_tiny_linux(tmp_path / "cache")


# --------------------------------------------------------------------------------------------------
# real builds (cached between runs in the default cache directory)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def busybox_guest() -> TinyLinux:
    if not HAVE_APT:
        pytest.skip("building the guest needs apt-get and dpkg-deb")
    return build_tiny_linux()


@pytest.fixture(scope="session")
def python_guest() -> TinyLinux:
    if not HAVE_APT:
        pytest.skip("building the guest needs apt-get and dpkg-deb")
    return build_tiny_linux(python=True)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio tool is not installed")
def test_built_initramfs_contents(busybox_guest: TinyLinux, python_guest: TinyLinux) -> None:

    names = set(_cpio(["-it"], busybox_guest.initrd.read_bytes()).split())
    # merged /usr, as Debian's own systems: /bin, /sbin, /lib, /lib64 are links into /usr
    assert {"init", "usr/bin/busybox", "usr/bin/sh", "usr/sbin/acpid", "dev/console"} <= names
    assert {"bin", "sbin", "lib", "lib64", "etc/acpi/PWRF/00000080"} <= names
    assert {f"usr/lib/modules/pyti/{m}.ko" for m in busybox_guest.modules} <= names
    assert not any(n.startswith("usr/lib/python3") for n in names)
    mods = busybox_guest.modules
    assert mods.index("virtio") < mods.index("virtio_pci") < mods.index("virtio_blk")
    assert mods.index("fat") < mods.index("vfat")
    assert busybox_guest.kernel_release.endswith("cloud-amd64")
    assert busybox_guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # an x86 bzImage

    py_names = set(_cpio(["-it"], python_guest.initrd.read_bytes()).split())
    assert {
        "usr/bin/python3",
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/zipfile.py",
        "usr/lib/os-release",
        "etc/os-release",
        "usr/lib64/ld-linux-x86-64.so.2",
    } <= py_names
    assert not any(n.startswith("usr/lib/python3.11/test/") for n in py_names)
    assert not any("/unittest/test/" in n or "/idlelib/" in n for n in py_names)
    assert "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc" in py_names
    # the test tooling, preinstalled and byte-compiled by the guest's own Python
    assert python_guest.interpreter == "3.11"
    assert python_guest.precompiled
    assert {"pip", "pytest", "pluggy"} <= set(python_guest.preinstalled)
    assert "usr/local/lib/python3.11/dist-packages/_pytest/__pycache__/main.cpython-311.pyc" in py_names
    assert python_guest.glibc >= (2, 36)
    assert python_guest.initrd.stat().st_size < 120 * 1024 * 1024  # uncompressed


def test_build_is_cached(busybox_guest: TinyLinux) -> None:
    cache = busybox_guest.kernel.parent.parent
    before = busybox_guest.initrd.stat().st_mtime_ns
    again = build_tiny_linux(cache)
    assert again == busybox_guest
    assert again.initrd.stat().st_mtime_ns == before  # not rebuilt


@needs_apt
def test_changed_init_rebuilds_and_concurrent_builders_agree(
    busybox_guest: TinyLinux, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(busybox_guest.kernel.parent.parent / "debs", cache / "debs")  # no re-download
    (cache / ".build-left-by-a-killed-builder").mkdir()
    code = (
        "import sys; from pathlib import Path; from pyti_core.guest import tinylinux as t; "
        "t.INIT_SCRIPT = t.INIT_SCRIPT.replace('# pyti tiny guest', '# changed guest'); "
        "g = t.build_tiny_linux(Path(sys.argv[1])); print(g.initrd)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    built = Path(outputs[0])
    assert built.parent.name != busybox_guest.initrd.parent.name
    assert [p.name for p in cache.iterdir() if p.name.startswith(".build-")] == []

    assert b"# changed guest" in built.read_bytes()


def test_cached_build_is_used_when_apt_is_unavailable(
    busybox_guest: TinyLinux, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on it
    assert build_tiny_linux(busybox_guest.kernel.parent.parent) == busybox_guest
    # nothing cached with these modules: it must be built, and the tools are missing
    with pytest.raises(GuestImageError, match="not found; building the guest needs a Debian-like host"):
        build_tiny_linux(busybox_guest.kernel.parent.parent, modules=["virtio_blk"])


@needs_apt
def test_unknown_module_is_named(busybox_guest: TinyLinux) -> None:
    with pytest.raises(GuestImageError, match="no_such_module"):
        build_tiny_linux(busybox_guest.kernel.parent.parent, modules=["virtio_blk", "no-such-module"])


# --------------------------------------------------------------------------------------------------
# booting under TCG
# --------------------------------------------------------------------------------------------------


# pyti's own guests run with this much memory; a Python guest's uncompressed initramfs (75-125 MB)
# does not unpack in 256 MiB ("Initramfs unpacking failed: write error").
GUEST_MEMORY_MIB: int = attrs.fields(GuestSystem).memory.default


class Serial:
    """A QEMU process with its serial console on stdin/stdout and a QMP socket."""

    def __init__(self, guest: TinyLinux, cmdline: str, disks: Sequence[Path], tmp_path: Path) -> None:
        self.qmp_path = tmp_path / "qmp.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(GUEST_MEMORY_MIB), "-nographic", "-no-reboot",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", cmdline,
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        for disk in disks:
            argv += ["-drive", f"file={disk},format=raw,if=virtio"]
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.output = b""

    def wait_for(self, text: str, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds since start when ``text`` appeared; fails with the console output on timeout."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            if not ready:
                pytest.fail(f"no {text!r} on the serial console within {timeout} s:\n{self._tail()}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail(f"qemu exited before {text!r} appeared:\n{self._tail()}")
            self.output += chunk
        return time.monotonic() - self.start

    def _tail(self) -> str:
        return self.output[-3000:].decode(errors="replace")

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def powerdown(self) -> None:
        """Press the ACPI power button, as libvirt's ``shutdown()`` does."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rwb")
            stream.readline()
            for command in ("qmp_capabilities", "system_powerdown"):
                stream.write(json.dumps({"execute": command}).encode() + b"\n")
                stream.flush()
                reply = json.loads(stream.readline())
                while "event" in reply:  # asynchronous events may come before the reply
                    reply = json.loads(stream.readline())
                assert "return" in reply, reply

    def exited(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:  # keep draining the console
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                self.output += os.read(self.proc.stdout.fileno(), 65536)
        if self.proc.poll() is None:
            pytest.fail(f"qemu still running {timeout} s later:\n{self._tail()}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


Boot = Callable[..., Serial]


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Boot]:
    started: list[Serial] = []

    def start(guest: TinyLinux, cmdline: str, *disks: Path) -> Serial:
        serial = Serial(guest, cmdline, disks, tmp_path)
        started.append(serial)
        return serial

    yield start
    for serial in started:
        serial.close()


def _ext_disk(tmp_path: Path, files: dict[str, bytes], *, fstype: str = "ext4", name: str = "disk") -> Path:
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    disk = tmp_path / f"{name}.raw"
    with open(disk, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    subprocess.run(["mke2fs", "-q", "-F", "-t", fstype, "-d", str(tree), str(disk)], check=True, timeout=60)
    return disk


def _debugfs_cat(disk: Path, path: str) -> bytes:
    proc = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(disk)], capture_output=True, check=True, timeout=60
    )
    return proc.stdout


@pytest.mark.qemu
@needs_qemu
def test_busybox_guest_runs_a_script_from_its_ext_disk(
    busybox_guest: TinyLinux, boot: Boot, tmp_path: Path
) -> None:
    run = b"echo started; uname -r > /mnt/disk/x; cat /proc/mounts >> /mnt/disk/x; exit 3\n"
    disk = _ext_disk(tmp_path, {"run.sh": run})
    serial = boot(busybox_guest, busybox_guest.cmdline_with(run="/mnt/disk/run.sh"), disk)
    ready = serial.wait_for(READY_MARKER)
    serial.wait_for(f"{RUN_EXIT_MARKER} 3")
    assert serial.exited(30) == 0
    print(f"busybox guest: {READY_MARKER} after {ready:.2f} s under TCG")
    written = _debugfs_cat(disk, "/x").decode()
    assert written.startswith(busybox_guest.kernel_release)
    assert "/dev/vda /mnt/disk ext4 rw" in written
    subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True, timeout=60)


@pytest.mark.qemu
@needs_qemu
def test_busybox_guest_shell_and_power_button(busybox_guest: TinyLinux, boot: Boot, tmp_path: Path) -> None:
    disk = _ext_disk(tmp_path, {"keep": b"k"})
    serial = boot(busybox_guest, busybox_guest.cmdline, disk)
    serial.wait_for(READY_MARKER)
    serial.wait_for("pyti# ")
    serial.type("echo $((6*7)) > /mnt/disk/answer; echo answer=$((6*7))")
    serial.wait_for("answer=42\r\n", 60)
    pressed = time.monotonic()
    serial.powerdown()
    assert serial.exited(30) == 0
    print(f"busybox guest: power button to qemu exit {time.monotonic() - pressed:.2f} s")
    assert _debugfs_cat(disk, "/answer") == b"42\n"  # synced and unmounted before power-off
    subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True, timeout=60)


@pytest.mark.qemu
@needs_qemu
def test_busybox_guest_mounts_the_disk_named_on_the_command_line(
    busybox_guest: TinyLinux, boot: Boot, tmp_path: Path
) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(4 * 1024 * 1024))  # /dev/vda: no file system, not mounted
    disk = _ext_disk(tmp_path, {"run.sh": b"grep /mnt/disk /proc/mounts > /mnt/disk/m\n"}, fstype="ext2")
    cmdline = busybox_guest.cmdline_with(run="/mnt/disk/run.sh", extra=["pyti.disk=/dev/vda,/dev/vdb"])
    serial = boot(busybox_guest, cmdline, blank, disk)
    serial.wait_for(f"{RUN_EXIT_MARKER} 0")
    assert serial.exited(30) == 0
    assert _debugfs_cat(disk, "/m").startswith(b"/dev/vdb /mnt/disk ext")
    assert blank.read_bytes() == bytes(4 * 1024 * 1024)


@pytest.mark.qemu
@needs_qemu
def test_busybox_guest_without_echo_and_panic_reboots(busybox_guest: TinyLinux, boot: Boot) -> None:
    serial = boot(busybox_guest, busybox_guest.cmdline_with(extra=["pyti.echo=0"]))
    serial.wait_for(READY_MARKER)
    serial.wait_for("pyti# ")
    serial.type("echo answer=$((6*7))")
    serial.wait_for("answer=42\r\n", 60)
    assert b"echo answer" not in serial.output  # the typed line is not echoed back
    serial.type("echo c > /proc/sysrq-trigger")  # a kernel panic: panic=-1 reboots, -no-reboot exits
    assert serial.exited(60) == 0
    assert b"Kernel panic" in serial.output


@pytest.mark.qemu
@needs_qemu
@pytest.mark.skipif(
    shutil.which("mkfs.vfat") is None or shutil.which("mcopy") is None, reason="needs dosfstools+mtools"
)
def test_busybox_guest_mounts_a_fat_disk(busybox_guest: TinyLinux, boot: Boot, tmp_path: Path) -> None:
    disk = tmp_path / "fat.raw"
    with open(disk, "wb") as fh:
        fh.truncate(32 * 1024 * 1024)
    subprocess.run(["mkfs.vfat", str(disk)], check=True, capture_output=True, timeout=60)
    script = tmp_path / "run.sh"
    script.write_bytes(b"grep /mnt/disk /proc/mounts > /mnt/disk/OUT.TXT\n")
    subprocess.run(["mcopy", "-i", str(disk), str(script), "::RUN.SH"], check=True, timeout=60)
    serial = boot(busybox_guest, busybox_guest.cmdline_with(run="/mnt/disk/RUN.SH"), disk)
    serial.wait_for(f"{RUN_EXIT_MARKER} 0")
    assert serial.exited(30) == 0
    out = subprocess.run(
        ["mtype", "-i", str(disk), "::OUT.TXT"], check=True, capture_output=True, timeout=60
    ).stdout
    assert out.startswith(b"/dev/vda /mnt/disk vfat rw")


@pytest.mark.qemu
@needs_qemu
def test_python_guest_imports_what_the_agent_needs(python_guest: TinyLinux, boot: Boot) -> None:
    serial = boot(python_guest, python_guest.cmdline)
    ready = serial.wait_for(READY_MARKER)
    serial.wait_for("pyti# ")
    typed = time.monotonic()
    serial.type(
        "python3 -c 'import json, subprocess, resource, zipfile, shutil, tempfile, xml.etree.ElementTree, "
        "ssl, sqlite3, ctypes, lzma, bz2, decimal; "
        'print(6 * 7, sys.version_info[:2]) if (sys := __import__("sys")) else 0\''
    )
    serial.wait_for("42 (3, 11)\r\n", 60)
    print(
        f"python guest: {READY_MARKER} after {ready:.2f} s, python3 imports {time.monotonic() - typed:.2f} s"
    )
    serial.powerdown()
    assert serial.exited(30) == 0


@pytest.mark.qemu
@needs_qemu
@pytest.mark.skipif(not AGENT.is_file(), reason="pyti_core/guest/agent.py is not there")
def test_python_guest_runs_the_agent(python_guest: TinyLinux, boot: Boot, tmp_path: Path) -> None:
    from pyti_core.rawdata import parse_records

    job = {
        "distribution": "none",
        "tasks": [
            {
                "id": "1",
                "name": "hello",
                "argv": ["python3", "-c", "print('hi from the guest')"],
                "timeout": 60,
            },
            {"id": "2", "name": "fails", "argv": ["sh", "-c", "exit 5"], "timeout": 60},
        ],
    }
    disk = _ext_disk(
        tmp_path,
        {
            "agent.py": AGENT.read_bytes(),
            "io/job.json": json.dumps(job).encode(),
            "run.sh": b"python3 /mnt/disk/agent.py /mnt/disk/io\n",
        },
    )
    serial = boot(python_guest, python_guest.cmdline_with(run="/mnt/disk/run.sh"), disk)
    serial.wait_for(RUN_EXIT_MARKER)
    assert serial.exited(30) == 0
    records = parse_records(_debugfs_cat(disk, "/io/results/records.jsonl").decode().splitlines())
    assert [(r.status, r.exit_code) for r in records] == [("passed", 0), ("failed", 5)]
    assert "hi from the guest" in records[0].stdout
