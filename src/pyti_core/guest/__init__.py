"""What runs inside a pyti test VM, and how its minimal guest is built.

:mod:`pyti_core.guest.tinylinux` builds a tiny Linux guest (a Debian cloud kernel and a busybox
initramfs, optionally with Python) that boots in seconds under QEMU.
"""

from __future__ import annotations

__all__: list[str] = []
