"""The live channel in real TCG guests: tests as they run, a frozen agent caught, a flood survived.

Three guest boots in all:

* the tiny package (one passing, one failing test) with pytest and the channel on, then a hostile task
  that steals the agent's port (``pidfd_getfd``, as root in the guest may) and writes 100 MB of random
  bytes into it, then one more task: test outcomes reach the host while the guest still runs, the host
  cuts the channel off without its memory growing, and every record still comes home from the IO disk;
* a task that freezes the agent (``SIGSTOP``): the run ends within the stall timeout plus a margin,
  not at the job timeout, and the unfinished tasks are errors that say so, with the console's tail;
* the same short job with the channel off: the job, the VM and the results are as before the channel.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from pyti_core.channel import ChannelConfig, ChannelEvent, TaskFinished, TestReport
from pyti_core.errors import GuestImageError
from pyti_core.manager import GuestSystem, run_prepared
from pyti_core.packages import Distribution, bundled_pip_wheel, prepare_distribution
from pyti_core.tasks import Recipe, Task
from tests.pyti_core.test_e2e import PYTEST_DISTRIBUTIONS, wheel_of_installed
from tests.pyti_core.test_packages import make_wheel, tiny_pair

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs"),
]

#: Steals the agent's open port (its grandparent's fd to /dev/vport*) and writes 100 MB of garbage.
FLOOD = r"""
import ctypes, os, select, sys, time
agent = int(open("/proc/%d/stat" % os.getppid()).read().rsplit(")", 1)[1].split()[1])
libc = ctypes.CDLL(None, use_errno=True)
fd = None
for name in os.listdir("/proc/%d/fd" % agent):
    if os.readlink("/proc/%d/fd/%s" % (agent, name)).startswith("/dev/vport"):
        pidfd = libc.syscall(434, agent, 0)            # pidfd_open
        fd = libc.syscall(438, pidfd, int(name), 0)    # pidfd_getfd
        break
if fd is None or fd < 0:
    sys.exit("no port to steal: errno %d" % ctypes.get_errno())
junk = os.urandom(1 << 20)
poller = select.poll()
poller.register(fd, select.POLLOUT)
sent, idle = 0, time.monotonic()
while sent < 100 << 20 and time.monotonic() - idle < 5:
    events = poller.poll(500)
    if not any(ev & select.POLLOUT for _, ev in events):
        if events:
            time.sleep(0.1)   # POLLHUP: the host hung up on us
        continue
    try:
        sent += os.write(fd, junk[: (100 << 20) - sent])
        idle = time.monotonic()
    except BlockingIOError:
        continue
print("garbage written: %d bytes" % sent)
"""

#: Stops the agent (the task's grandparent): no heartbeat, no record, no end; the guest hangs.
FREEZE = 'kill -STOP "$(cut -d" " -f4 /proc/$PPID/stat)"; echo agent stopped'


@pytest.fixture(scope="module")
def guest() -> GuestSystem:
    try:
        return GuestSystem.default()
    except GuestImageError as exc:
        pytest.skip(f"the tiny Python guest cannot be built here: {exc}")


@pytest.fixture(scope="module")
def distribution(tmp_path_factory: pytest.TempPathFactory) -> Distribution:
    root = tmp_path_factory.mktemp("index")
    for name in PYTEST_DISTRIBUTIONS:
        wheel_of_installed(name, root / "wheels")
    main, dep = tiny_pair(root / "projects")
    make_wheel(dep, root / "wheels")
    return prepare_distribution(
        main,
        root / "dist",
        requirements=("pytest",),
        no_index=True,
        find_links=[root / "wheels"],
        pip_wheel=bundled_pip_wheel(),
        build_isolation=False,
    )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Watch:
    """Records when each event and each phase arrived, and this process's peak RSS meanwhile."""

    def __init__(self) -> None:
        self.events: list[tuple[float, ChannelEvent]] = []
        self.phases: list[tuple[float, str, str]] = []
        self.baseline = _rss_kib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_kib())

    def on_event(self, event: ChannelEvent) -> None:
        self.events.append((time.monotonic(), event))

    def progress(self, phase: str, message: str) -> None:
        self.phases.append((time.monotonic(), phase, message))

    def first(self, phase: str) -> float:
        return min(t for t, p, _ in self.phases if p == phase)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_tests_reach_the_host_while_the_guest_runs_and_a_flood_is_cut_off(
    guest: GuestSystem, distribution: Distribution, tmp_path: Path
) -> None:
    recipe = Recipe(
        "live",
        (
            Task("install", "install"),
            Task("pytest", "pytest", 300, argv=("-p", "no:randomly")),
            Task("flood", "command", 120, argv=("python3", "-c", FLOOD)),
            Task("after", "command", 60, argv=("sh", "-c", "echo still here")),
        ),
        ("pytest",),
    )
    watch = Watch()
    try:
        result = run_prepared(
            distribution, recipe, guest=guest, timeout=600, work_dir=tmp_path / "run",
            progress=watch.progress, on_event=watch.on_event,
        )  # fmt: skip
    finally:
        watch.stop()
    records = {r.task: r for r in result.report.records}
    # the IO disk is the truth: every task has its record, as if there were no channel
    names = [r.task for r in result.report.records]
    expected = ["install", "install-requirements", "pytest", "flood", "after"]
    assert names == expected, result.report.records[-1].stderr
    assert records["pytest"].status == "failed"
    assert records["pytest"].tests is not None
    assert (records["pytest"].tests.passed, records["pytest"].tests.failed) == (1, 1)
    assert records["flood"].status == "passed", records["flood"].stderr
    assert "garbage written" in records["flood"].stdout
    assert records["after"].stdout == "still here\n"
    # each test's outcome arrived while the guest was still running (before the host collected)
    collected_at = watch.first("collect")
    tests = [(t, e) for t, e in watch.events if isinstance(e, TestReport)]
    outcomes = {e.nodeid.split("::")[-1]: e.outcome for _, e in tests}
    assert outcomes == {"test_double": "passed", "test_wrong": "failed"}
    assert all(t < collected_at for t, _ in tests)
    shown = [m for _, p, m in watch.phases if p == "tasks"]
    assert any(m.startswith("pytest: FAILED") and m.endswith("::test_wrong") for m in shown), shown
    finished = [e.task for _, e in watch.events if isinstance(e, TaskFinished)]
    assert finished[:3] == ["install", "install-requirements", "pytest"]
    # the flood: cut off, the host's memory did not grow with it, the run was not held up
    assert result.channel is not None
    assert result.channel.cut_off is not None
    assert result.channel.bytes < 32 << 20
    assert watch.peak - watch.baseline < 64 * 1024, (watch.baseline, watch.peak)
    assert not result.stalled
    assert not result.timed_out
    print("channel:", result.channel, "RSS growth KiB:", watch.peak - watch.baseline, result.phases)


def _short_recipe(*tasks: Task) -> Recipe:
    return Recipe("short", (Task("before", "command", 60, argv=("sh", "-c", "echo before")), *tasks))


def test_a_frozen_agent_ends_the_run_within_the_stall_timeout(
    guest: GuestSystem, distribution: Distribution, tmp_path: Path
) -> None:
    # how the agent finds its port without udev: by name, in sysfs
    ports = "ls /dev/virtio-ports 2>&1; for p in /sys/class/virtio-ports/*; do echo $p $(cat $p/name); done"
    recipe = _short_recipe(
        Task("ports", "command", 60, argv=("sh", "-c", ports)),
        Task("freeze", "command", 60, argv=("sh", "-c", FREEZE)),
        Task("never", "command", 60, argv=("sh", "-c", "echo never")),
    )
    stall = 8.0
    watch = Watch()
    t0 = time.monotonic()
    try:
        result = run_prepared(
            distribution, recipe, guest=guest, timeout=600, work_dir=tmp_path / "run",
            progress=watch.progress, channel=ChannelConfig(stall_timeout=stall, heartbeat=1.0),
        )  # fmt: skip
    finally:
        watch.stop()
    elapsed = time.monotonic() - t0
    assert result.stalled
    assert not result.timed_out
    assert result.phases["tasks"] < stall + 20  # the job timeout was 600 s
    assert elapsed < 120
    before, ports, freeze, never = result.report.records
    assert before.status == "passed"
    assert "/sys/class/virtio-ports/vport" in ports.stdout
    assert "org.pyti.rpc.0" in ports.stdout
    print("ports in the guest:", ports.stdout)
    assert (freeze.status, never.status) == ("error", "error")
    assert "the guest stopped responding while this task ran" in freeze.stderr
    console_tail = freeze.stderr.split("--- serial console (last lines) ---\n", 1)[1]
    assert console_tail.strip()  # the console's last lines, to see what the guest was doing
    assert freeze.duration_s > stall - 1
    assert "before this task started" in never.stderr
    assert any("stopped responding" in m for _, _, m in watch.phases)


def test_with_the_channel_off_a_run_is_as_before(
    guest: GuestSystem, distribution: Distribution, tmp_path: Path
) -> None:
    events: list[ChannelEvent] = []
    result = run_prepared(
        distribution, _short_recipe(), guest=guest, timeout=600, work_dir=tmp_path / "run",
        channel=None, on_event=events.append,
    )  # fmt: skip
    assert result.ok
    assert [r.stdout for r in result.report.records] == ["before\n"]
    assert result.channel is None
    assert events == []
    assert not (tmp_path / "run" / "rpc.sock").exists()
