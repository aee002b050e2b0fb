"""The original PyTI method names, in one mixin.

PyTI's first API used camelCase (``createSnapshot``, ``rollback``, ...). :class:`VirtualMachine` keeps
those names working through :class:`PyTICompat`, each a plain alias of the snake_case method it names;
new code should use the snake_case ones. Nothing here is deprecated or warns.

=======================  ========================================
``createSnapshot``       :meth:`VirtualMachine.snapshot`
``deleteSnapshot``       :meth:`VirtualMachine.delete_snapshot`
``listSnapshots``        names of :meth:`VirtualMachine.snapshots`
``revertToSnapshot``     :meth:`VirtualMachine.rollback`
=======================  ========================================

(``start``, ``stop`` and ``rollback`` already had these names.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._snapshots import Snapshot

__all__ = ["PyTICompat"]


class _Snapshots(Protocol):
    def snapshot(self, name: str, description: str = "") -> Snapshot: ...
    def delete_snapshot(self, name: str, *, children: bool = False) -> None: ...
    def snapshots(self) -> list[Snapshot]: ...
    def rollback(self, name: str | None = None) -> None: ...


class PyTICompat:
    """camelCase aliases from the original PyTI API (see the module docstring)."""

    __slots__ = ()

    def createSnapshot(self: _Snapshots, name: str, description: str = "") -> Snapshot:
        """Alias of :meth:`VirtualMachine.snapshot`."""
        return self.snapshot(name, description)

    def deleteSnapshot(self: _Snapshots, name: str) -> None:
        """Alias of :meth:`VirtualMachine.delete_snapshot`."""
        self.delete_snapshot(name)

    def listSnapshots(self: _Snapshots) -> list[str]:
        """Snapshot names, oldest first (see :meth:`VirtualMachine.snapshots` for the details)."""
        return [s.name for s in self.snapshots()]

    def revertToSnapshot(self: _Snapshots, name: str) -> None:
        """Alias of :meth:`VirtualMachine.rollback`."""
        self.rollback(name)
