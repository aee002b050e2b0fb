"""pyti_core: test a Python distribution inside a network-less virtual machine.

``pyti_core.run("attrs==23.2.0")`` downloads the distribution and its dependencies for the guest, boots
a clean guest with no network device, runs the recipe's tasks there and returns a :class:`RunResult`
whose ``report`` holds one raw-data record per task; :class:`TaskManager` runs many at once.

The building blocks are here — fetching a distribution for the guest (:func:`prepare_distribution`),
recipes and the guest agent's job (:class:`Recipe`, :func:`to_agent_job`), JSON-RPC 2.0 raw-data
records (:class:`RawDataRecord`, :class:`Report`), TOML job files (:class:`JobConfig`) and the tiny
test guest (``pyti_core.guest.tinylinux``). While a guest runs, its agent reports tasks and test
outcomes over the live channel (:class:`ChannelConfig`, events in ``pyti_core.channel``). Many hosts
share the work through ``pyti_core.farm`` (Dask).
"""

from __future__ import annotations

from pyti_core.channel import ChannelConfig, ChannelEvent, ChannelStats
from pyti_core.config import JobConfig
from pyti_core.errors import (
    ChannelFrameError,
    ConfigError,
    CpioEntryError,
    FarmError,
    GuestBootError,
    GuestImageError,
    GuestRunError,
    ImagePrepareError,
    LedgerError,
    LedgerInUseError,
    PackageError,
    PytiError,
    RawDataError,
    SchedulerLostError,
    TaskError,
    TaskManagerClosedError,
    UnsafeArchiveError,
)
from pyti_core.manager import GuestSystem, RunMatrix, RunResult, run, run_prepared
from pyti_core.packages import Distribution, GuestTarget, prepare_distribution
from pyti_core.rawdata import RawDataRecord, Report, TestCounts, parse_record, parse_records
from pyti_core.task_manager import TaskManager
from pyti_core.tasks import RECIPES, GuestLayout, Recipe, Task, get_recipe, stage_io_folder, to_agent_job

__all__ = [
    "RECIPES",
    "ChannelConfig",
    "ChannelEvent",
    "ChannelFrameError",
    "ChannelStats",
    "ConfigError",
    "CpioEntryError",
    "Distribution",
    "FarmError",
    "GuestBootError",
    "GuestImageError",
    "GuestLayout",
    "GuestRunError",
    "GuestSystem",
    "GuestTarget",
    "ImagePrepareError",
    "JobConfig",
    "LedgerError",
    "LedgerInUseError",
    "PackageError",
    "PytiError",
    "RawDataError",
    "RawDataRecord",
    "Recipe",
    "Report",
    "RunMatrix",
    "RunResult",
    "SchedulerLostError",
    "Task",
    "TaskError",
    "TaskManager",
    "TaskManagerClosedError",
    "TestCounts",
    "UnsafeArchiveError",
    "get_recipe",
    "parse_record",
    "parse_records",
    "prepare_distribution",
    "run",
    "run_prepared",
    "stage_io_folder",
    "to_agent_job",
]
