"""vmanager against the raw libvirt-python calls it wraps, and a real TCG guest's operation times.

Part 1 (libvirt's test driver, ``test:///default``): median latency of each VirtualMachine operation
against the libvirt call(s) that do the same thing, measured in the same run; the ratio should stay
<= 1.2x for the operations that matter (start, stop, snapshot, rollback, delete).

Part 2 (the tiny Linux guest under QEMU/TCG on the embedded driver, same run): snapshot and rollback
of a running guest (until it answers on its console again) on a qcow2 disk (internal snapshots) and on a
VDI disk (external snapshots: overlays + saved memory; the first one also moves the guest off the VDI
by block copy), against overlay rollback (discard + boot); offline snapshot and rollback of the VDI;
start to the ready marker, ACPI shutdown and hard stop.

    python benchmarks/bench_vmanager.py [-n 300] [--runs 3] [--skip-qemu]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def paired_us(
    raw: Callable[[], object], ours: Callable[[], object], n: int, setup: Callable[[], object] | None = None
) -> tuple[float, float]:
    """Median wall times (microseconds) of ``raw`` and ``ours`` over ``n`` calls each, interleaved.

    Interleaving makes both see the same hypervisor state (e.g. the same number of snapshots, which the
    cost of some calls grows with) and the same machine load. ``setup`` runs untimed before each call.
    """
    raw_t: list[int] = []
    ours_t: list[int] = []
    for i in range(2 * n):
        if setup is not None:
            setup()
        fn, out = (raw, raw_t) if i % 2 == 0 else (ours, ours_t)
        t = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t)
    return statistics.median(raw_t) / 1000, statistics.median(ours_t) / 1000


def bench_test_driver(n: int) -> None:
    import libvirt  # noqa: PLC0415 - the raw reference (loaded by vmanager first, see main)

    from vmanager import Connection, VirtualMachine, VMConfig  # noqa: PLC0415

    uri = "test:///default"
    conn = Connection(uri)
    raw = conn.raw
    config = VMConfig(name="bench", memory=128, hd_location="/images/bench.qcow2")
    vm = VirtualMachine("bench", conn, config)
    dom = raw.lookupByName("bench")
    rows: list[tuple[str, float, float]] = []

    def stopped() -> None:
        if dom.state()[0] != libvirt.VIR_DOMAIN_SHUTOFF:
            dom.destroy()

    def running() -> None:
        if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
            dom.create()

    rows.append(("lookup / attach", *paired_us(lambda: raw.lookupByName("bench"),
                                               lambda: VirtualMachine("bench", conn), n)))  # fmt: skip
    rows.append(("start", *paired_us(dom.create, vm.start, n, stopped)))
    rows.append(("stop (destroy)", *paired_us(dom.destroy, vm.stop, n, running)))
    rows.append(("state", *paired_us(dom.state, lambda: vm.state, n)))

    counter = iter(range(10**9))
    names: list[str] = []

    def raw_snap() -> None:
        name = f"s{next(counter)}"
        names.append(name)
        dom.snapshotCreateXML(f"<domainsnapshot><name>{name}</name></domainsnapshot>", 0)

    def vm_snap() -> None:
        name = f"s{next(counter)}"
        names.append(name)
        vm.snapshot(name)

    running()
    rows.append(("snapshot create", *paired_us(raw_snap, vm_snap, n)))
    target = names[0]
    rows.append(("rollback (running snapshot)",
                 *paired_us(lambda: dom.revertToSnapshot(dom.snapshotLookupByName(target, 0), 0),
                            lambda: vm.rollback(target), n)))  # fmt: skip
    doomed = iter(names[1:])
    rows.append(("snapshot delete",
                 *paired_us(lambda: dom.snapshotLookupByName(next(doomed), 0).delete(0),
                            lambda: vm.delete_snapshot(next(doomed)), (len(names) - 1) // 2)))  # fmt: skip
    vm.undefine()

    print(f"== vmanager vs raw libvirt-python on {uri} (median of {n} calls, microseconds)")
    print(f"{'operation':30} {'libvirt':>10} {'vmanager':>10} {'ratio':>7}")
    for name, base, ours in rows:
        print(f"{name:30} {base:10.1f} {ours:10.1f} {ours / base:6.2f}x")
    conn.close()


def bench_qemu(runs: int) -> None:
    from pyti_core.guest.tinylinux import READY_MARKER, build_tiny_linux  # noqa: PLC0415
    from vmanager import Connection, VirtualMachine, VMConfig, detect_accelerator  # noqa: PLC0415
    from vmanager._libvirt import embed_uri  # noqa: PLC0415

    guest = build_tiny_linux()
    tmp = Path(tempfile.mkdtemp(prefix="bench-vmanager-"))
    raw_disk = tmp / "base.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw_disk), "64M"], check=True, capture_output=True)
    disk = tmp / "system.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw_disk), str(disk)], check=True)
    vdi = tmp / "system.vdi"
    subprocess.run(["qemu-img", "convert", "-O", "vdi", str(raw_disk), str(vdi)], check=True)
    results: dict[str, list[float]] = {}

    def record(key: str, start: float) -> None:
        results.setdefault(key, []).append(time.monotonic() - start)

    counter = iter(range(10**6))

    def answer(vm: VirtualMachine) -> None:
        n = next(counter)
        vm.console_write(f"echo PONG-$(({n} + 1000))\n")
        vm.console_expect(f"PONG-{n + 1000}", timeout=60)

    def kwargs(name: str, hd: Path) -> dict[str, object]:
        return {
            "name": name, "memory": 256, "hd_location": hd, "kernel": guest.kernel,
            "initrd": guest.initrd, "cmdline": guest.cmdline, "serial_log": tmp / f"{name}.log",
        }  # fmt: skip

    with Connection(embed_uri(tmp / "libvirt")) as conn:
        vm = VirtualMachine("bench-snap", conn, VMConfig(**kwargs("bench-snap", disk)))  # type: ignore[arg-type]
        ovl = VirtualMachine.with_overlay(
            "bench-ovl",
            conn,
            VMConfig(**kwargs("bench-ovl", raw_disk)),
            overlay_dir=tmp / "ovl",  # type: ignore[arg-type]
        )
        ext = VirtualMachine(
            "bench-vdi", conn, VMConfig(**kwargs("bench-vdi", vdi), overlay_dir=tmp / "layers")
        )  # type: ignore[arg-type]
        try:
            for i in range(runs):
                t = time.monotonic()
                vm.start()
                vm.wait_for_output(READY_MARKER, 120)
                record("start to ready marker", t)
                t = time.monotonic()
                vm.snapshot(f"s{i}")
                record("snapshot (running guest)", t)
                answer(vm)
                t = time.monotonic()
                vm.rollback(f"s{i}")
                answer(vm)
                record("snapshot rollback, until the guest answers", t)
                t = time.monotonic()
                vm.shutdown(timeout=60)
                record("shutdown (ACPI, until SHUTOFF)", t)
                vm.start()
                vm.wait_for_output(READY_MARKER, 120)
                t = time.monotonic()
                vm.stop()
                record("stop (hard)", t)

                ovl.start()
                ovl.wait_for_output(READY_MARKER, 120)
                answer(ovl)
                t = time.monotonic()
                ovl.rollback()
                ovl.wait_for_output(READY_MARKER, 120)
                answer(ovl)
                record("overlay rollback, until the guest answers", t)
                ovl.stop()
                t = time.monotonic()
                ovl.discard_overlay()
                record("overlay discard alone (VM off)", t)

                ext.start()
                ext.wait_for_output(READY_MARKER, 120)
                answer(ext)
                t = time.monotonic()
                ext.snapshot(f"r{i}")
                record("VDI external snapshot (running)" + (", 1st: + block copy" if i == 0 else ""), t)
                answer(ext)
                t = time.monotonic()
                ext.rollback(f"r{i}")
                answer(ext)
                record("VDI external rollback, until the guest answers", t)
                ext.stop()
                t = time.monotonic()
                ext.snapshot(f"o{i}")
                record("VDI external snapshot (VM off)", t)
                t = time.monotonic()
                ext.rollback(f"o{i}")
                record("VDI external rollback (VM off)", t)
        finally:
            vm.undefine()
            ovl.undefine()
            ext.undefine()
    print(
        f"\n== tiny Linux guest on qemu:///embed, accelerator {detect_accelerator()} ({runs} runs, seconds)"
    )
    print(f"{'operation':45} {'median':>8} {'min':>8} {'max':>8}")
    for key, values in results.items():
        print(f"{key:45} {statistics.median(values):8.2f} {min(values):8.2f} {max(values):8.2f}")
    print("(libvirt reports SHUTOFF up to ~2 s late on machines whose PID 1 reaps children slowly)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=300, help="calls per test-driver operation")
    parser.add_argument("--runs", type=int, default=3, help="runs of the real guest")
    parser.add_argument("--skip-qemu", action="store_true", help="only the test-driver part")
    args = parser.parse_args()
    import vmanager  # noqa: F401, PLC0415 - loads libvirt first, its log lines routed to logging

    bench_test_driver(args.n)
    if not args.skip_qemu:
        bench_qemu(args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
