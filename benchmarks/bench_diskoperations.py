"""DiskOperations against libguestfs and qemu-storage-daemon, measured in the same run on the same disk.

1. Small files, from nothing to closed: one 4 KiB file in and another out of a 1 GiB ext4 VDI (made by
   ``qemu-img convert``, MBR partition 1). diskhandler runs in a fresh Python process (interpreter
   start-up and imports included, with bytecode caches as after an install; best of N, so the first
   run's compilation is not counted) and, separately, inside an already running one; libguestfs runs
   ``guestfish -a disk.vdi -m /dev/sda1 upload ... : download ...`` with ``LIBGUESTFS_BACKEND=direct``
   and ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (this machine's KVM cannot run guests); skipped, with a
   note, when guestfish is not installed. Goal: >= 150x.
2. 200 MiB: upload a 200 MiB random file (mount, copy, unmount), then download it (mount, copy,
   unmount), against ``qemu-storage-daemon`` exporting the partition of the same VDI through its FUSE
   export with ``fuse2fs -o fakeroot`` on top and the same Python copy loop. Goal: diskhandler's time
   <= 0.7x the reference's.
3. diskhandler's peak memory during the 200 MiB transfer: the sum of VmRSS over the whole process tree
   (the Python process, the vdfuse server, fuse2fs), sampled every 5 ms; PSS too (RSS counts the pages a
   forked vdfuse server shares with its parent twice). Goal: RSS <= 100 MiB.

guestfish needs a kernel for its appliance: on a machine without one in /boot, unpack Debian's
``linux-image-*-cloud-amd64`` package (``apt-get download``, ``dpkg -x``, ``depmod -b``) and point
``SUPERMIN_KERNEL`` and ``SUPERMIN_MODULES`` at its ``vmlinuz`` and ``lib/modules/VERSION``.

Usage: ``python benchmarks/bench_diskoperations.py [--repeat 3] [--big-mib 200] [--no-guestfs] [--dir D]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from diskhandler import DiskOperations
from diskhandler.vdfuse import libfuse_version

MiB = 1 << 20
DISK_SIZE = 1024 * MiB
PART_START = MiB

SMALL_SCRIPT = """
import sys
from diskhandler import DiskOperations
d = DiskOperations(sys.argv[1])
d.mount()
d.upload(sys.argv[2], "/in.txt")
d.download("/root/b.txt", sys.argv[3])
d.close_connection()
"""

BIG_SCRIPT = """
import sys
from diskhandler import DiskOperations
with DiskOperations(sys.argv[1]) as d:
    d.upload(sys.argv[2], "/big.bin")
with DiskOperations(sys.argv[1]) as d:
    d.download("/big.bin", sys.argv[3])
"""


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stderr.decode()}")
    return proc


def best_of(repeat: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def make_vdi(d: Path, name: str) -> tuple[Path, int]:
    """A 1 GiB VDI made by qemu-img: MBR, one ext4 partition from 1 MiB, /root/b.txt inside."""
    files = d / "files"
    if not files.exists():
        (files / "root").mkdir(parents=True)
        (files / "root" / "b.txt").write_bytes(os.urandom(4096))
    flat = d / f"{name}.raw"
    with flat.open("wb") as f:
        f.truncate(DISK_SIZE)
    run("parted", "-s", flat, "mklabel", "msdos", "mkpart", "primary", "ext4", "1MiB", "100%")
    out = run("parted", "-s", "-m", flat, "unit", "B", "print").stdout.decode()
    size = next(int(line.split(":")[3][:-1]) for line in out.splitlines() if line.startswith("1:"))
    size -= size % 4096
    run(
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-d",
        files,
        "-E",
        f"offset={PART_START}",
        flat,
        f"{size // 1024}k",
    )
    vdi = d / f"{name}.vdi"
    run("qemu-img", "convert", "-f", "raw", "-O", "vdi", flat, vdi)
    flat.unlink()
    return vdi, size


# -- process-tree memory --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            kids += [int(x) for x in text.split()]
    except OSError:
        pass
    return kids


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _kib(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed RSS and PSS of a process tree in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.pid)
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- the contenders ---------------------------------------------------------------------------------


# A fresh process compiles nothing when bytecode caches exist, as after a normal install; with
# PYTHONDONTWRITEBYTECODE set (as in some CI set-ups) every run would recompile the whole package.
FRESH_ENV: dict[str, str] = {}


def diskhandler_fresh(script: str, *args: Path) -> TreeMemory:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stderr=subprocess.PIPE, env=FRESH_ENV or None
    )
    mem = TreeMemory(proc.pid)
    _, err = proc.communicate()
    mem.stop()
    if proc.returncode != 0:
        raise SystemExit(f"diskhandler failed:\n{err.decode()}")
    return mem


def diskhandler_in_process(image: Path, src: Path, dst: Path) -> None:
    d = DiskOperations(image)
    d.mount()
    d.upload(src, "/in2.txt")
    d.download("/root/b.txt", dst)
    d.close_connection()


def guestfish(image: Path, src: Path, dst: Path) -> None:
    env = {**os.environ, "LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    run(
        "guestfish",
        "-a",
        image,
        "-m",
        "/dev/sda1",
        "upload",
        src,
        "/in.txt",
        ":",
        "download",
        "/root/b.txt",
        dst,
        env=env,
    )


def _wait_mounted(path: Path, proc: subprocess.Popen[bytes]) -> None:
    target = os.fsencode(os.path.abspath(path))
    while True:
        with open("/proc/self/mountinfo", "rb") as f:
            if any(line.split()[4] == target for line in f):
                return
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"{proc.args!r} exited {proc.returncode}: {err}")
        time.sleep(0.002)


def qsd_session(image: Path, part_size: int, d: Path, copy: Callable[[Path], None]) -> None:
    """qemu-storage-daemon FUSE export of the partition + fuse2fs; ``copy(mountpoint)``; unmount both."""
    export = d / "qsd-export"
    export.touch()
    mp = d / "qsd-mnt"
    mp.mkdir(exist_ok=True)
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file,filename={image}",
            "--blockdev", "driver=vdi,node-name=fmt,file=file",
            "--blockdev", f"driver=raw,node-name=part,file=fmt,offset={PART_START},size={part_size}",
            "--export", f"type=fuse,id=e,node-name=part,mountpoint={export},writable=on",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_mounted(export, qsd)
        fs = subprocess.Popen(
            ["fuse2fs", str(export), str(mp), "-f", "-o", "fakeroot,rw"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_mounted(mp, fs)
            copy(mp)
        finally:
            fs.terminate()
            fs.wait()
    finally:
        qsd.terminate()
        qsd.wait()


def copy_file(src: Path, dst: Path) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, MiB)


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--no-guestfs", action="store_true", help="skip libguestfs (about 30 s per run)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        d = Path(scratch)
        FRESH_ENV.update(os.environ)
        FRESH_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        FRESH_ENV["PYTHONPYCACHEPREFIX"] = str(d / "pycache")  # bytecode caches outside the source tree
        ours, part_size = make_vdi(d, "ours")
        theirs, _ = make_vdi(d, "theirs")
        small = d / "in.txt"
        small.write_bytes(os.urandom(4096))
        expected = (d / "files" / "root" / "b.txt").read_bytes()

        print("vdfuse server on libfuse {}.{}".format(*libfuse_version()))
        print("== 4 KiB in and 4 KiB out of a 1 GiB ext4 VDI, from nothing to closed")
        fresh = best_of(args.repeat, lambda: diskhandler_fresh(SMALL_SCRIPT, ours, small, d / "out1"))
        assert (d / "out1").read_bytes() == expected
        warm = best_of(args.repeat, lambda: diskhandler_in_process(ours, small, d / "out2"))
        assert (d / "out2").read_bytes() == expected
        print(f"diskhandler, fresh python process : {fresh:8.3f} s")
        print(f"diskhandler, inside python        : {warm:8.3f} s")
        if args.no_guestfs:
            print("libguestfs                        : skipped (--no-guestfs)")
        elif shutil.which("guestfish") is None:
            print("libguestfs                        : not installed (apt-get install libguestfs-tools)")
        else:
            gf = best_of(1, lambda: guestfish(theirs, small, d / "out3"))
            assert (d / "out3").read_bytes() == expected
            print(f"libguestfs (guestfish, TCG)       : {gf:8.3f} s")
            print(
                f"speed-up: {gf / fresh:.0f}x (fresh process), {gf / warm:.0f}x (inside python); goal >= 150x"
            )

        print(f"\n== {args.big_mib} MiB upload (mount, copy, unmount) then download, same VDI")
        big = d / "big.bin"
        with big.open("wb") as f:
            for _ in range(args.big_mib):
                f.write(os.urandom(MiB))
        digest = sha(big)
        back = d / "back.bin"
        peaks: list[TreeMemory] = []

        def ours_big() -> None:
            back.unlink(missing_ok=True)
            peaks.append(diskhandler_fresh(BIG_SCRIPT, ours, big, back))

        def qsd_big() -> None:
            back.unlink(missing_ok=True)
            qsd_session(theirs, part_size, d, lambda mp: copy_file(big, mp / "big.bin"))
            qsd_session(theirs, part_size, d, lambda mp: copy_file(mp / "big.bin", back))

        t_ours = best_of(args.repeat, ours_big)
        assert sha(back) == digest
        t_qsd = best_of(args.repeat, qsd_big)
        assert sha(back) == digest
        print(f"diskhandler (vdfuse + fuse2fs)            : {t_ours:8.3f} s")
        print(f"qemu-storage-daemon FUSE export + fuse2fs : {t_qsd:8.3f} s")
        print(f"ratio: {t_ours / t_qsd:.2f}x of the reference's time (goal <= 0.7x)")
        rss = max(m.peak_rss for m in peaks) / 1024
        pss = max(m.peak_pss for m in peaks) / 1024
        print(f"\n== peak memory of diskhandler's process tree during the {args.big_mib} MiB transfer")
        print(f"RSS sum {rss:.1f} MiB, PSS sum {pss:.1f} MiB (goal: RSS <= 100 MiB)")
        run("qemu-img", "check", ours)


if __name__ == "__main__":
    main()
