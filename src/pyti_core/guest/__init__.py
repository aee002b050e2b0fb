"""Everything that defines or runs inside a pyti guest.

* :mod:`pyti_core.guest.protocol` — what host and guest agree on: serial markers, kernel command-line
  keys, the IO disk's files, ``run.sh`` and the typed ``job.json`` schema;
* :mod:`pyti_core.guest.agent` — the standard-library-only agent copied to the IO disk, which runs the
  job's tasks and writes one raw-data record per task;
* :mod:`pyti_core.guest.bytecode` — byte code made on the host for the guest (pip, compiled);
* :mod:`pyti_core.guest.tinylinux` — the tiny Linux guest (a Debian cloud kernel and a busybox
  initramfs with Python) that boots in seconds under QEMU.
"""

from __future__ import annotations

__all__: list[str] = []
