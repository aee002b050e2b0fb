"""Opening the parents of snapshot chains safely: cycles and depth are checked in one place.

Each format finds its own parent (a VDI by UUID, a VHD by locators, a VMDK by parentFileNameHint, a
qcow2 by its backing file name); it then opens it through :meth:`ChainGuard.open_parent`, which refuses
a chain that loops or is absurdly deep and always opens parents read-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from diskhandler.errors import ChainError

if TYPE_CHECKING:
    from diskhandler.formats._stream import DiskImage

__all__ = ["MAX_CHAIN_DEPTH", "ChainGuard"]

MAX_CHAIN_DEPTH = 64


@attrs.frozen
class ChainGuard:
    """The files already on the way from the leaf to here, leaf first."""

    seen: tuple[str, ...] = ()

    def enter(self, path: Path) -> ChainGuard:
        """The guard for opening ``path``; raises :class:`ChainError` on a loop or too deep a chain."""
        real = os.path.realpath(path)
        if real in self.seen:
            loop = " -> ".join([*self.seen, real])
            raise ChainError(path, "parent", f"snapshot chain loops back on itself: {loop}")
        if len(self.seen) >= MAX_CHAIN_DEPTH:
            raise ChainError(path, "parent", f"snapshot chain is deeper than {MAX_CHAIN_DEPTH} images")
        return ChainGuard((*self.seen, real))

    def open_parent(
        self,
        child: Path,
        parent: Path,
        *,
        format: str | None = None,
        opener: Callable[..., DiskImage] | None = None,
    ) -> DiskImage:
        """Open ``parent`` of ``child`` read-only, as ``format`` when the child names it."""
        from diskhandler.formats import open_image  # noqa: PLC0415  (formats imports this module)

        if not parent.exists():
            raise ChainError(
                child, "parent", f"parent image {parent} does not exist; restore it or rebase the image"
            )
        if opener is not None:
            return opener(parent, guard=self)
        return open_image(parent, writable=False, format=format, _guard=self)
