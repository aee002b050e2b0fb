"""Run states of a VM and which operations each allows.

:class:`RunState` mirrors libvirt's ``virDomainState``. :data:`STOPPED` and :data:`ACTIVE` are the two
groups operations check against (``start`` needs a stopped VM, the console a running one, ...).
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["ACTIVE", "STOPPED", "RunState", "snapshot_state"]


class RunState(enum.Enum):
    """A domain's run state (libvirt's ``virDomainState``)."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4  # shutting down
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


#: libvirt's state numbers, in order: ``STATES[code]`` is the RunState of a ``virDomainState`` code.
STATES: Final = tuple(RunState)

#: States in which nothing runs: ``start`` is allowed, ``stop`` and ``shutdown`` are no-ops.
STOPPED: Final = (RunState.SHUTOFF, RunState.CRASHED, RunState.NOSTATE)

#: States in which a QEMU process exists (paused and shutting down included).
ACTIVE: Final = (
    RunState.RUNNING,
    RunState.BLOCKED,
    RunState.PAUSED,
    RunState.SHUTDOWN,
    RunState.PMSUSPENDED,
)

#: States a rollback brings back as running (or paused) rather than shut off.
RESUMABLE: Final = (RunState.RUNNING, RunState.BLOCKED, RunState.PAUSED)

_SNAPSHOT_STATES: Final = {
    "nostate": RunState.NOSTATE,
    "running": RunState.RUNNING,
    "blocked": RunState.BLOCKED,
    "paused": RunState.PAUSED,
    "shutdown": RunState.SHUTDOWN,
    "shutoff": RunState.SHUTOFF,
    "crashed": RunState.CRASHED,
    "pmsuspended": RunState.PMSUSPENDED,
    "disk-snapshot": RunState.SHUTOFF,
}


def state_of(code: int) -> RunState:
    """The RunState of a libvirt ``virDomainState`` code (unknown codes: NOSTATE)."""
    return STATES[code] if 0 <= code < len(STATES) else RunState.NOSTATE


def snapshot_state(text: str | None) -> RunState:
    """The RunState a snapshot's ``<state>`` element names (a disk-only snapshot counts as shut off)."""
    return _SNAPSHOT_STATES.get(text or "", RunState.NOSTATE)
