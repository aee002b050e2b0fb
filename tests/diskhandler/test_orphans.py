"""Nothing is orphaned: when the process owning a mount dies, its FUSE children flush, unmount and exit.

A real owner process mounts an ext4 VDI with DiskOperations (vdfuse server + fuse2fs), writes a file
and is then killed with SIGTERM or SIGKILL, or crashes (``os.abort``). Within seconds no mount and no
child may be left, the image lock must be free (qemu-io opens the image for writing), and qemu-img
check and e2fsck must find the image and its filesystem clean, with the file written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.diskhandler.imagetools import qemu_check, run

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

MiB = 1 << 20
DEADLINE = 20.0  # generous: the machine is shared; the children normally go in well under a second

OWNER = """
import json, os, sys, time
from pathlib import Path
how, image, payload = sys.argv[1:4]
if how in ("diskoperations", "threaded", "kernel", "forks"):
    from diskhandler import DiskOperations
    if how == "threaded":  # a second thread: the vdfuse server is spawned, not forked
        import threading
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    d = DiskOperations(image, method="kernel" if how == "kernel" else "fuse")
    d.mount()
    d.put_file(payload, "/payload.bin")
    info = {"pids": [p for p in (d._view.process.pid, d._fs.pid) if p is not None],
            "mounts": [str(d._view.mountpoint), str(d._fs.mountpoint)]}
    if how == "forks":  # a forked copy of the owner outlives it; it must not keep the mount alive
        sleeper = os.fork()
        if sleeper == 0:
            time.sleep(600)
            os._exit(0)
        info["sleeper"] = sleeper
else:  # a filesystem driver mounted on its own, on a raw ext4 image
    from diskhandler.filesystems import mount_filesystem
    mp = Path(sys.argv[4])
    fs = mount_filesystem(image, mp, "ext")
    (mp / "payload.bin").write_bytes(Path(payload).read_bytes())
    info = {"pids": [fs.pid, fs._watcher.pid], "mounts": [str(mp)]}
print(json.dumps(info), flush=True)
if sys.argv[-1] == "abort":
    os.abort()
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a slow init to reap it holds no mount and no lock)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _mounted(path: str) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def _lock_free(image: Path, fmt: str) -> bool:
    proc = subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "read 0 512", str(image)], capture_output=True, check=False
    )
    return proc.returncode == 0 and b"lock" not in proc.stderr


def _ext4_image(tmp_path: Path, fmt: str) -> Path:
    flat = tmp_path / "fs.raw"
    with flat.open("wb") as f:
        f.truncate(64 * MiB)
    run("mke2fs", "-q", "-F", "-t", "ext4", flat)
    if fmt == "raw":
        return flat
    image = tmp_path / f"disk.{fmt}"
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, flat, image)
    flat.unlink()
    return image


@pytest.mark.parametrize(
    ("how", "death"),
    [
        ("diskoperations", "SIGTERM"),
        ("diskoperations", "SIGKILL"),
        ("diskoperations", "abort"),
        ("threaded", "SIGKILL"),
        ("forks", "SIGKILL"),
        pytest.param(
            "kernel",
            "SIGKILL",
            marks=pytest.mark.skipif(os.geteuid() != 0, reason="a kernel (loop) mount needs root"),
        ),
        ("mount_filesystem", "SIGKILL"),
    ],
)
def test_owner_death_leaves_nothing_behind(tmp_path: Path, how: str, death: str) -> None:
    fmt = "raw" if how == "mount_filesystem" else "vdi"
    image = _ext4_image(tmp_path, fmt)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(3 * MiB + 123))
    mp = tmp_path / "mnt"
    mp.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, how, str(image), str(payload), str(mp), death],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    info: dict[str, Any] = {}
    try:
        line = owner.stdout.readline() if owner.stdout else b""
        assert line, owner.stderr.read().decode() if owner.stderr else ""
        info = json.loads(line)
        assert all(_alive(pid) for pid in info["pids"])
        assert all(_mounted(m) for m in info["mounts"])
        if fmt != "raw":  # the check below means something: vdfuse holds the lock now
            assert not _lock_free(image, fmt)
        if death != "abort":
            owner.send_signal(getattr(signal, death))
        owner.wait(30)
        assert owner.returncode == -(signal.SIGABRT if death == "abort" else getattr(signal, death))
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            if not any(_alive(p) for p in info["pids"]) and not any(_mounted(m) for m in info["mounts"]):
                break
            time.sleep(0.05)
        gone_after = DEADLINE - (deadline - time.monotonic())
        assert not [p for p in info["pids"] if _alive(p)], "a FUSE child outlived its owner"
        assert not [m for m in info["mounts"] if _mounted(m)], "a mount outlived its owner"
        assert gone_after < DEADLINE
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if "sleeper" in info:
            os.kill(info["sleeper"], signal.SIGKILL)
        if owner.stdout:
            owner.stdout.close()
        if owner.stderr:
            owner.stderr.close()
    assert _lock_free(image, fmt)
    flat = image
    if fmt != "raw":
        qemu_check(image, fmt)
        flat = tmp_path / "after.raw"
        run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, flat)
    fsck = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, check=False)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    out = tmp_path / "back.bin"
    run("debugfs", "-R", f"dump /payload.bin {out}", flat)
    assert out.read_bytes() == payload.read_bytes()


@pytest.mark.parametrize("mountpoint", ["/tmp/plain", "/tmp/with space\nand newline", "/tmp/\udcff-not-utf8"])
def test_lifeline_messages_carry_any_mount_point(mountpoint: str) -> None:
    from diskhandler._fusechild import _decode, _encode

    for message in ({"guard": 1234, "mountpoint": mountpoint}, {"release": None, "mountpoint": mountpoint}):
        line = _encode(message)
        assert line.count(b"\n") == 1
        assert line.endswith(b"\n")
        assert _decode(line[:-1]) == message


def test_a_dropped_mount_stops_its_server(tmp_path: Path) -> None:
    """A vdfuse mount object forgotten while mounted does not run until the interpreter exits."""
    import gc

    from diskhandler.vdfuse import mount_vdfuse

    image = _ext4_image(tmp_path, "vdi")
    mp = tmp_path / "mnt"
    mp.mkdir()
    mount = mount_vdfuse(image, mp)
    process = mount.process
    assert _mounted(str(mp))
    del mount
    gc.collect()
    process.wait(DEADLINE)  # reaped here: the server is this process's child
    assert not _mounted(str(mp))
    assert _lock_free(image, "vdi")
    qemu_check(image, "vdi")


def test_a_standalone_driver_and_its_watcher_stop_together(tmp_path: Path) -> None:
    from diskhandler.filesystems import mount_filesystem

    image = _ext4_image(tmp_path, "raw")
    mp = tmp_path / "mnt"
    mp.mkdir()
    fs = mount_filesystem(image, mp, "ext")
    watcher = fs._watcher
    assert watcher is not None
    assert watcher.poll() is None
    (mp / "x").write_bytes(b"x")
    fs.unmount()
    assert watcher.poll() is not None
    assert not _mounted(str(mp))
    run("e2fsck", "-fn", image)
