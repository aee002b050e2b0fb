"""What the host and a pyti guest agree on, in one place.

Everything a guest sees of pyti crosses one of these:

* **the kernel command line** of a direct-kernel-boot guest (:data:`CMDLINE_RUN`, :data:`CMDLINE_DISK`,
  :data:`CMDLINE_ECHO`, :data:`CMDLINE_AGENT`; :func:`kernel_cmdline` renders them);
* **the serial console**, where the guest prints :data:`READY_MARKER` once the IO disk is mounted and
  :data:`RUN_EXIT_MARKER` followed by ``run.sh``'s exit status just before it powers off;
* **the IO disk** (filesystem label :data:`IO_LABEL`, mounted at :data:`IO_MOUNT`): ``job.json``
  (:class:`AgentJob`), the agent (``agent.py``, :mod:`pyti_core.guest.agent`), ``run.sh``
  (:func:`run_script`) and, coming back, ``results/records.jsonl`` (one raw-data record per line,
  :mod:`pyti_core.rawdata`).
* **the live channel** (optional), a virtio-serial port named :data:`CHANNEL_PORT` whose host end is a
  unix socket: length-prefixed JSON-RPC 2.0 frames, the sync handshake and the events, all defined in
  :mod:`pyti_core.guest.livechannel` (copied beside the agent as :data:`CHANNEL_MODULE_FILE`) and read
  by :mod:`pyti_core.channel`; the job's ``channel`` object (:class:`AgentChannel`) turns it on, and
  pytest tasks then load the plugin :data:`PLUGIN_MODULE` from :data:`PLUGIN_DIR` on the IO disk.
  Advisory only: the records on the IO disk stay the results.

The tiny guest's ``/init`` (:mod:`pyti_core.guest.tinylinux`) and the boot hook that
``pyti image prepare`` installs (:mod:`pyti_core.image`) implement the guest's side; the run
(:mod:`pyti_core.manager`) implements the host's. The agent is copied verbatim to the IO disk and cannot
import this module: its copies of the record method and the job keys are checked against this module
by the tests.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Final, NotRequired, TypedDict

from pyti_core.guest import livechannel

__all__ = [
    "AGENT_FILE",
    "CHANNEL_MODULE_FILE",
    "CHANNEL_PORT",
    "CMDLINE_AGENT",
    "CMDLINE_DISK",
    "CMDLINE_ECHO",
    "CMDLINE_RUN",
    "IO_LABEL",
    "IO_MOUNT",
    "JOB_FILE",
    "PLUGIN_DIR",
    "PLUGIN_MODULE",
    "READY_MARKER",
    "RECORDS_FILE",
    "RUN_EXIT_MARKER",
    "RUN_SCRIPT",
    "AgentChannel",
    "AgentJob",
    "AgentTask",
    "kernel_cmdline",
    "run_script",
]

#: Printed on the serial console once the guest is up and its IO disk is mounted.
READY_MARKER: Final = "PYTI-GUEST-READY"
#: Printed after ``run.sh`` ends, followed by a space and its exit status, just before power-off.
RUN_EXIT_MARKER: Final = "PYTI-RUN-EXIT"

#: ``pyti.run=PATH``: the script the tiny guest's ``/init`` runs (then it powers off).
CMDLINE_RUN: Final = "pyti.run"
#: ``pyti.disk=DEV[,DEV...]``: the block devices ``/init`` tries, in order, for the IO disk.
CMDLINE_DISK: Final = "pyti.disk"
#: ``pyti.echo=0``: the interactive shell on the serial console runs without echo or line editing.
CMDLINE_ECHO: Final = "pyti.echo"
#: ``pyti.agent=0``: the boot hook of a prepared system disk leaves the boot alone.
CMDLINE_AGENT: Final = "pyti.agent"

#: The filesystem label of pyti's IO disks; the boot hook of a prepared system looks for it first.
IO_LABEL: Final = "pyti-io"
#: Where the guest mounts the IO disk (the job's paths point there).
IO_MOUNT: Final = "/mnt/disk"
#: Files at the top of the IO disk.
JOB_FILE: Final = "job.json"
AGENT_FILE: Final = "agent.py"
RUN_SCRIPT: Final = "run.sh"
#: The agent appends one JSON-RPC 2.0 raw-data record per line here (relative to the IO disk).
RECORDS_FILE: Final = "results/records.jsonl"

#: The live channel's virtio-serial port name (``<target type='virtio' name='...'/>``).
CHANNEL_PORT: Final = livechannel.PORT_NAME
#: The guest's end of the live channel, copied beside the agent (which imports it).
CHANNEL_MODULE_FILE: Final = "livechannel.py"
#: The folder on the IO disk holding the pytest plugin, and the plugin's module name (``-p pyti_live``).
PLUGIN_DIR: Final = "pyti-live"
PLUGIN_MODULE: Final = livechannel.PLUGIN_MODULE

_SAFE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_./=,:")


class AgentTask(TypedDict):
    """One task of ``job.json``: what the agent runs and how it reports it.

    ``argv`` runs without a shell in its own session; ``cwd`` is absolute or relative to the IO disk;
    ``timeout`` is in seconds; ``parse`` is ``"junit:PATH"`` (pytest's ``--junitxml``), ``"unittest"``
    (unittest's closing lines on stderr) or ``None``; ``env`` is added to the agent's environment;
    ``stop_on_failure`` ends the job when this task does not pass.
    """

    id: str
    name: str
    argv: list[str]
    timeout: float
    cwd: str
    parse: str | None
    env: dict[str, str]
    stop_on_failure: bool


class AgentChannel(TypedDict, total=False):
    """The job's ``channel`` object: the live channel is on (absent: off, the job runs as without it).

    ``port`` is the virtio-serial port's name, ``heartbeat_s`` how often the agent sends a heartbeat,
    ``plugin_dir`` the guest folder holding the pytest plugin (put on the tasks' ``PYTHONPATH``);
    ``device`` (a path, a character device or a unix socket) overrides the lookup by name.
    """

    port: str
    heartbeat_s: float
    plugin_dir: str
    device: str


class AgentJob(TypedDict):
    """``job.json``: the distribution under test, the cap on each task's stdout/stderr, the tasks,
    and the live channel's settings when it is on."""

    distribution: str
    output_cap: int
    tasks: list[AgentTask]
    channel: NotRequired[AgentChannel]


def _word(value: str, what: str) -> str:
    if not value or not set(value) <= _SAFE:
        raise ValueError(f"{what} may only hold letters, digits and - _ . / = , :, got {value!r}")
    return value


def kernel_cmdline(base: str, *, run: str | None = None, disks: Sequence[str] = ()) -> str:
    """``base`` plus ``pyti.disk=`` (the IO disk's candidate devices) and ``pyti.run=`` (the script).

    Raises ``ValueError`` for a path or device name that would split into several words.
    """
    words = [base] if base else []
    if disks:
        words.append(f"{CMDLINE_DISK}=" + ",".join(_word(d, "a disk device") for d in disks))
    if run is not None:
        words.append(f"{CMDLINE_RUN}={_word(run, 'the pyti.run path')}")
    return " ".join(words)


def run_script(
    *,
    python: str,
    io_dir: str = IO_MOUNT,
    work_dir: str,
    system_mount: tuple[str, str] | None = None,
) -> str:
    """``run.sh``, the script the guest runs from the IO disk: run the agent on the job, sync.

    ``python`` is the guest's interpreter, ``io_dir`` the IO disk's mount point and ``work_dir`` the
    folder the agent starts in. ``system_mount=(device, mount_point)`` first mounts a system disk (a
    direct-kernel-boot guest with a disk of its own). The script's exit status is the agent's: 0 when
    every task passed, 1 when one did not, 70 when the work folder is missing.
    """
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# Written by pyti: run the agent on this IO disk's job; the guest powers off afterwards.",
    ]
    if system_mount is not None:
        device, mnt = (q(v) for v in system_mount)
        lines += [
            f"mkdir -p {mnt}",
            f"mount {device}1 {mnt} 2>/dev/null || mount {device} {mnt} 2>/dev/null "
            f"|| echo 'pyti: cannot mount the system disk at '{mnt}",
        ]
    lines += [
        f"cd {q(work_dir)} || exit 70",
        f"{q(python)} {q(io_dir + '/' + AGENT_FILE)} {q(io_dir)}",
        "status=$?",
        "sync",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"
