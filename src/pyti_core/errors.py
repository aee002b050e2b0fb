"""Errors raised by pyti_core.

::

    PytiError
    └── RawDataError (ValueError)     a raw-data record is not JSON, too large, or breaks the schema
"""

from __future__ import annotations

__all__ = ["PytiError", "RawDataError"]


class PytiError(Exception):
    """Root of every error pyti_core raises on purpose."""


class RawDataError(PytiError, ValueError):
    """A raw-data record (or report) is not valid: not JSON, oversized, or missing/mistyped fields.

    ``record`` is the index of the offending record in its file when known, else ``None``.
    """

    def __init__(self, message: str, *, record: int | None = None) -> None:
        self.record = record
        where = f"record {record}: " if record is not None else ""
        super().__init__(f"{where}{message}")
