"""Binary layouts declared once: a frozen attrs class whose fields carry their struct codes.

Example::

    @binary_layout(">")
    class Footer(Layout):
        cookie: bytes = ffield("8s")
        features: int = ffield("I")

    footer = Footer.from_bytes(data, path=p)   # ImageFormatError if data is short
    data = footer.to_bytes()
    Footer.SIZE                                 # struct size in bytes

Field names live in one place, next to their codes; there is no format string with a parallel list of
names to drift apart.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import attrs
from typing_extensions import dataclass_transform

from diskhandler.errors import ImageFormatError

__all__ = ["Layout", "binary_layout", "ffield"]

_STRUCT_KEY = "struct"


def ffield(code: str, **kwargs: Any) -> Any:
    """An attrs field stored with struct ``code`` (e.g. ``"I"``, ``"Q"``, ``"16s"``)."""
    metadata = dict(kwargs.pop("metadata", {}))
    metadata[_STRUCT_KEY] = code
    return attrs.field(metadata=metadata, **kwargs)


class Layout:
    """Base of binary layouts made with :func:`binary_layout`."""

    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    NAME: ClassVar[str]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, path: Path | None = None) -> Self:
        """Parse the first ``SIZE`` bytes of ``data``."""
        if len(data) < cls.SIZE:
            raise ImageFormatError(
                path, cls.NAME, f"needs {cls.SIZE} bytes but only {len(data)} are there (truncated?)"
            )
        values = cls.STRUCT.unpack_from(data)
        return cls(*values)

    def evolve(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (``attrs.evolve``)."""
        return attrs.evolve(self, **changes)  # type: ignore[misc]

    def to_bytes(self) -> bytes:
        """Serialise to exactly ``SIZE`` bytes."""
        return self.STRUCT.pack(*attrs.astuple(self, recurse=False))  # type: ignore[arg-type]


_L = TypeVar("_L", bound=type[Layout])


@dataclass_transform(frozen_default=True, field_specifiers=(attrs.field, ffield))
def binary_layout(byte_order: str, name: str | None = None) -> Callable[[_L], _L]:
    """Make ``cls`` a frozen attrs class and compute its struct from the fields' codes."""

    def wrap(cls: _L) -> _L:
        frozen = attrs.frozen(cls)
        codes = [f.metadata[_STRUCT_KEY] for f in attrs.fields(frozen)]  # type: ignore[arg-type]
        frozen.STRUCT = struct.Struct(byte_order + "".join(codes))
        frozen.SIZE = frozen.STRUCT.size
        frozen.NAME = name or cls.__name__
        return frozen

    return wrap
