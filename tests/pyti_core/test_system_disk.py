"""Real system disks: ``pyti image build --os debian-12`` and ``pyti run --guest IMAGE``.

The Debian 12 disk is built once (mmdebstrap from Debian's archive, about a minute) and cached in the
user's pyti cache, so later runs of this module only write it out (a few seconds per format). On it:

* every output format passes ``qemu-img check`` and holds exactly the cached disk's bytes
  (``qemu-img compare``); the MBR holds GRUB's boot code and one bootable partition; e2fsprogs sees
  the root filesystem, pyti's hook and GRUB's configuration in it;
* :func:`pyti_core.image.inspect_image` reads its Python, glibc and release without booting it;
* ``pyti run PROJECT --guest debian.vdi`` boots it through the BIOS (no direct kernel boot) with
  systemd, runs the tiny package's tests and brings the records home, whose ``environment`` says
  systemd is PID 1 on Debian 12; the VDI's bytes do not change;
* a copy whose kernel is broken stops in GRUB: :class:`GuestBootError` with the serial console's tail;
* an image without pyti's hook is refused before anything is downloaded or booted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from diskhandler import DiskOperations, list_partitions, open_image
from pyti_core.cli import EXIT_ERROR, EXIT_FAILED, main
from pyti_core.errors import GuestBootError, GuestImageError, ImagePrepareError
from pyti_core.guest.system import (
    FORMATS,
    RELEASES,
    SystemDisk,
    build_system_disk,
    write_system_disk,
)
from pyti_core.image import inspect_image
from pyti_core.manager import GuestSystem, run_prepared
from pyti_core.tasks import RECIPES
from tests.pyti_core.test_e2e import PYTEST_DISTRIBUTIONS, _offline_tiny_distribution, wheel_of_installed
from tests.pyti_core.test_image import _disk, _rootfs, needs_tools
from tests.pyti_core.test_packages import make_wheel, tiny_pair

needs_builder = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mmdebstrap", "grub-mkimage", "qemu-img")),
    reason="needs mmdebstrap, grub-pc-bin and qemu-utils",
)
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


@pytest.fixture(scope="module")
def built() -> SystemDisk:
    """The Debian 12 system disk, from the user's cache (built there the first time)."""
    try:
        return build_system_disk("debian-12")
    except GuestImageError as exc:  # no mmdebstrap, or Debian's archive out of reach with nothing cached
        pytest.skip(f"the Debian 12 system disk cannot be built here: {exc}")


@pytest.fixture(scope="module")
def vdi(built: SystemDisk, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_system_disk(built, tmp_path_factory.mktemp("sysdisk") / "debian.vdi")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- the build --------------------------------------------------------------------------------


@needs_builder
@pytest.mark.system_disk
def test_a_warm_build_is_a_cache_hit(built: SystemDisk) -> None:
    started = time.monotonic()
    again = build_system_disk("debian-12")
    assert time.monotonic() - started < 10  # mmdebstrap alone takes about a minute
    assert again == built
    assert built.path.stat().st_blocks * 512 < 700 << 20  # sparse: only what is used
    assert built.kernel_release.endswith("-cloud-amd64")
    assert {"systemd", "systemd-sysv", "udev", "python3", "grub-pc"} & set(built.packages) == {
        "systemd", "systemd-sysv", "udev", "python3",
    }  # fmt: skip


@needs_builder
@pytest.mark.system_disk
def test_the_disk_boots_through_grub_from_one_bootable_partition(built: SystemDisk, tmp_path: Path) -> None:
    with open_image(built.path) as disk:
        sector0 = disk.read_at(0, 512)
        (part,) = list_partitions(disk)
        assert (part.start, part.bootable) == (1 << 20, True)
        diskboot = disk.read_at(512, 512)  # core.img's first sector ends with where the rest of it is
        assert int.from_bytes(diskboot[500:508], "little") == 2
        assert int.from_bytes(diskboot[508:510], "little") > 100  # sectors: GRUB with ext2 and linux
    assert sector0[510:512] == b"\x55\xaa"
    assert b"GRUB " in sector0[:440]  # boot.img's messages: "GRUB ", "Geom", "Hard Disk", ...
    fs = f"{built.path}?offset={1 << 20}"
    check = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True, check=False, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    listing = subprocess.run(
        ["debugfs", "-R", "cat /boot/grub/grub.cfg", fs],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert f"root=UUID={built.root_uuid}" in listing
    assert "console=ttyS0" in listing
    for guest_path in (
        "/opt/pyti/run-agent",
        "/etc/systemd/system/multi-user.target.wants/pyti-agent.service",
        "/vmlinuz",
        "/initrd.img",
        "/usr/lib/systemd/systemd",
    ):
        out = subprocess.run(
            ["debugfs", "-R", f"stat {guest_path}", fs],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert "Inode:" in out.stdout, (guest_path, out.stderr)


@needs_builder
@pytest.mark.system_disk
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_valid_and_holds_the_disk(built: SystemDisk, fmt: str, tmp_path: Path) -> None:
    out = write_system_disk(built, tmp_path / f"debian.{fmt}")
    assert out.stat().st_size < 600 << 20 or fmt == "raw"
    qemu_fmt = {"vhd": "vpc"}.get(fmt, fmt)
    if fmt not in ("raw", "vhd"):  # qemu-img checks neither; the comparison below reads them whole
        check = subprocess.run(
            ["qemu-img", "check", "-f", qemu_fmt, str(out)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    same = subprocess.run(
        ["qemu-img", "compare", "-f", qemu_fmt, "-F", "raw", str(out), str(built.path)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert same.returncode == 0, same.stdout + same.stderr
    with pytest.raises(FileExistsError):
        write_system_disk(built, out)


def test_unknown_os_format_and_size_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="debian-12"):
        build_system_disk("debian-7")
    with pytest.raises(ValueError, match="at least 1 GiB"):
        build_system_disk("debian-12", size=1 << 20)
    fake = SystemDisk(
        path=tmp_path / "x", release=RELEASES["debian-12"], size=1 << 30, kernel_release="", root_uuid=""
    )
    with pytest.raises(ValueError, match="vdi, qcow2, vmdk, vhd, raw"):
        write_system_disk(fake, tmp_path / "disk.iso")
    err = io.StringIO()
    assert main(["image", "build", "--os", "debian-12"], stdout=io.StringIO(), stderr=err) == 2
    assert "--output" in err.getvalue()


@needs_builder
@pytest.mark.system_disk
def test_inspect_reads_python_glibc_and_release_without_booting(vdi: Path) -> None:
    before = _sha256(vdi)
    info = inspect_image(vdi)
    assert (info.init, info.hook, info.prepared) == ("systemd", "systemd", True)
    assert info.python == "/usr/bin/python3"
    assert info.python_version == RELEASES["debian-12"].python
    assert info.glibc == RELEASES["debian-12"].glibc
    assert (info.os_release["ID"], info.os_release["VERSION_ID"]) == ("debian", "12")
    guest = GuestSystem.from_image(vdi)
    assert guest.target.python_version == (3, 11)
    assert (guest.kernel, guest.system_disk) == (None, vdi)
    assert _sha256(vdi) == before


# -- without pyti's hook ------------------------------------------------------------------------


@needs_tools
def test_an_image_without_the_hook_is_refused_before_anything_runs(tmp_path: Path) -> None:
    image = _disk(tmp_path, _rootfs(tmp_path / "tree", systemd=True), "qcow2", "mbr")
    with pytest.raises(ImagePrepareError, match=rf"pyti image prepare {image}"):
        GuestSystem.from_image(image)
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    # a requirement that cannot be resolved: the image check must come first
    code = main(
        ["run", "no-such-distribution-pyti==0", "--guest", str(image), "--plain"], stdout=out, stderr=err
    )
    assert time.monotonic() - started < 30
    assert code == EXIT_ERROR
    assert f"run `pyti image prepare {image}` first" in err.getvalue()
    assert "download" not in err.getvalue()  # nothing was resolved
    info = inspect_image(image)
    assert (info.init, info.hook) == ("systemd", None)


# -- booting it --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("index")
    for name in PYTEST_DISTRIBUTIONS:
        wheel_of_installed(name, root / "wheels")
    _main, dep = tiny_pair(root / "projects")
    make_wheel(dep, root / "wheels")
    return root / "wheels"


@needs_builder
@needs_qemu
@pytest.mark.e2e
@pytest.mark.system_disk
def test_pyti_run_on_the_debian_system_disk(vdi: Path, index: Path, tmp_path: Path) -> None:
    """The tiny package (one passing, one failing test) on Debian 12 booted by GRUB, with systemd."""
    before = _sha256(vdi)
    project, _dep = tiny_pair(tmp_path / "projects")
    out, err = io.StringIO(), io.StringIO()
    report = tmp_path / "report.json"
    code = main(
        [
            "run", str(project), "--guest", str(vdi), "--no-index", "--find-links", str(index),
            "--report", str(report), "--keep", "--work-dir", str(tmp_path / "work"), "--plain",
            "--timeout", "1800",  # a whole system under TCG on a busy host: minutes, not seconds
        ],
        stdout=out,
        stderr=err,
    )  # fmt: skip
    assert code == EXIT_FAILED, out.getvalue() + err.getvalue()
    data = json.loads(report.read_text())
    environment = data["environment"]  # measured inside the guest
    assert environment["init"] == "systemd"  # PID 1
    assert (environment["os_name"], environment["os_version"]) == ("Debian GNU/Linux", "12")
    assert environment["python_version"].startswith("3.11.")
    assert environment["kernel"].endswith("-cloud-amd64")
    records = {r["params"]["task"]: r["params"] for r in data["records"]}
    assert all(r["environment"] == environment for r in records.values())
    assert records["install"]["status"] == "passed"
    assert records["import"]["status"] == "passed"
    pytest_record = records["pytest"]
    assert pytest_record["status"] == "failed"
    assert (pytest_record["tests"]["passed"], pytest_record["tests"]["failed"]) == (1, 1)
    (serial,) = (tmp_path / "work").glob("pyti-run-*/run/serial.log")
    log = serial.read_text(errors="replace")
    assert "pyti: GRUB is loading Linux" in log  # booted by the BIOS and GRUB, not by direct kernel boot
    assert "run-agent[" in log  # the hook ran as a systemd service (its output through the journal)
    assert "PYTI-RUN-EXIT 1" in log
    assert _sha256(vdi) == before  # the base image was never written


@needs_builder
@needs_qemu
@pytest.mark.e2e
@pytest.mark.system_disk
def test_a_disk_that_cannot_boot_is_a_boot_error_with_the_console_tail(
    vdi: Path, index: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(vdi), "-F", "vdi", str(broken)],
        check=True,
        timeout=60,
    )
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(os.urandom(4096))
    with DiskOperations(broken) as ops:
        (kernel,) = (n for n in ops.listdir("/boot") if n.startswith("vmlinuz-"))
        ops.put_file(junk, f"/boot/{kernel}")
    guest = GuestSystem.from_image(broken, boot_timeout=120)
    started = time.monotonic()
    with pytest.raises(GuestBootError) as info:
        run_prepared(
            _offline_tiny_distribution(tmp_path, index),
            RECIPES["install-only"],
            guest=guest,
            timeout=300,
            work_dir=tmp_path / "run",
            uri=None,
            progress=None,
        )
    assert time.monotonic() - started < 100  # GRUB powers off: no waiting for the boot timeout
    assert "GRUB could not boot" in str(info.value)
    assert "--- serial console (last lines) ---" in str(info.value)
