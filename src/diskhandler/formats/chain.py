"""Opening the parents of snapshot chains safely: cycles and depth are checked in one place.

Each format finds its own parent (a VDI by UUID, a VHD by locators, a VMDK by parentFileNameHint, a
qcow2 by its backing file name); it then opens it through :meth:`ChainGuard.open_parent`, which refuses
a chain that loops or is absurdly deep, enforces the ``parents=`` policy of :func:`open_image` (see
:mod:`diskhandler.formats._files`) and always opens parents read-only. Extents in other files (VMDK)
are checked against the same policy through :meth:`ChainGuard.check_location`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from diskhandler.errors import ChainError
from diskhandler.formats._files import PolicyName, check_parent_location, open_image_file

if TYPE_CHECKING:
    from diskhandler.formats._stream import DiskImage

__all__ = ["MAX_CHAIN_DEPTH", "ChainGuard"]

MAX_CHAIN_DEPTH = 64


@attrs.frozen
class ChainGuard:
    """The files already on the way from the leaf to here, leaf first."""

    seen: tuple[str, ...] = ()
    policy: PolicyName | Path = "any"  # a normalized ParentPolicy

    def check_location(self, image: Path, referred: Path, role: str) -> None:
        """Raise ParentPolicyError when the policy forbids ``referred`` (a file ``image`` names)."""
        leaf = Path(self.seen[0]) if self.seen else image
        check_parent_location(self.policy, leaf, image, referred, role)

    def enter(self, path: Path) -> ChainGuard:
        """The guard for opening ``path``; raises :class:`ChainError` on a loop or too deep a chain."""
        real = os.path.realpath(path)
        if real in self.seen:
            loop = " -> ".join([*self.seen, real])
            raise ChainError(path, "parent", f"snapshot chain loops back on itself: {loop}")
        if len(self.seen) >= MAX_CHAIN_DEPTH:
            raise ChainError(path, "parent", f"snapshot chain is deeper than {MAX_CHAIN_DEPTH} images")
        return ChainGuard((*self.seen, real), self.policy)

    def open_parent(
        self,
        child: Path,
        parent: Path,
        *,
        format: str | None = None,
        opener: Callable[..., DiskImage] | None = None,
        role: str = "parent",
    ) -> DiskImage:
        """Open ``parent`` of ``child`` read-only, as ``format`` when the child names it.

        ``role`` names the parent in errors (``"parent"``, ``"backing file"``).
        """
        from diskhandler.formats import open_image  # noqa: PLC0415  (formats imports this module)

        self.check_location(child, parent, role)
        if not os.path.lexists(parent):
            raise ChainError(
                child, "parent", f"{role} {parent} does not exist; restore it or rebase the image"
            )
        # What the file is, named by its role ("the backing file is a FIFO"), before any parser runs.
        os.close(open_image_file(parent, role=role))
        if opener is not None:
            return opener(parent, guard=self)
        return open_image(parent, writable=False, format=format, parents=self.policy, _guard=self)
