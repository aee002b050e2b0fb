"""pyti_core: test a Python distribution inside a network-less virtual machine."""

from __future__ import annotations

__all__: list[str] = []
