"""``python -m pyti_core``: the ``pyti`` command."""

from __future__ import annotations

import sys

from pyti_core.cli import main

if __name__ == "__main__":
    sys.exit(main())
