"""vdi images (placeholder: the parser is being written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Self

from diskhandler.errors import UnsupportedImageError
from diskhandler.formats._stream import DiskImage
from diskhandler.formats.chain import ChainGuard

__all__ = ["VDIImage"]


class VDIImage(DiskImage):
    format: ClassVar[str] = "vdi"

    @classmethod
    def probe(cls, head: bytes, tail: bytes) -> bool:
        return False

    @classmethod
    def open(cls, path: Path, *, writable: bool, guard: ChainGuard) -> Self:
        raise UnsupportedImageError(path, None, "vdi support is not written yet")

    @classmethod
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        raise UnsupportedImageError(path, None, "vdi support is not written yet")
