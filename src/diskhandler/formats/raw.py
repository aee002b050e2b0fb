"""Raw images: the virtual disk is the file, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Self

from typing_extensions import override

from diskhandler.errors import ImageFormatError
from diskhandler.formats._files import open_image_file
from diskhandler.formats._stream import DiskImage, pwrite_all, zero_fill
from diskhandler.formats.chain import ChainGuard

__all__ = ["RawImage"]


class RawImage(DiskImage):
    """A raw disk image; its size is the file's size."""

    format: ClassVar[str] = "raw"

    @classmethod
    def probe(cls, head: bytes, tail: bytes) -> bool:
        """Raw matches anything; it is probed last."""
        return True

    @classmethod
    def open(cls, path: Path, *, writable: bool, guard: ChainGuard) -> Self:
        fd = open_image_file(path, writable=writable)
        return cls(path, fd, size=os.fstat(fd).st_size, writable=writable)

    @classmethod
    def create(
        cls, path: Path, size: int | None, *, parent: Path | None, guard: ChainGuard, **options: Any
    ) -> Self:
        if parent is not None:
            raise ValueError("raw images cannot have a parent; use qcow2, vdi, vhd or vmdk")
        if options:
            raise TypeError(f"raw images take no options, got {sorted(options)}")
        if size is None:
            raise ValueError("a new raw image needs a size")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.ftruncate(fd, size)
        return cls(path, fd, size=size, writable=True)

    @override
    def _readinto_at(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:  # the file shrank under us: what is missing reads as zeros
                zero_fill(buf[done:])
                raise ImageFormatError(self.path, "size", "raw image file was truncated while open")
            done += n

    @override
    def _write_at(self, offset: int, data: memoryview) -> None:
        pwrite_all(self._fd, data, offset)
