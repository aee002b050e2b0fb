#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run pyti's main job: test a real Python distribution inside a
# network-less QEMU guest and bring the results home.
#   bash scripts/main.sh                     # six 1.16.0: install, import check, its pytest suite
#   bash scripts/main.sh attrs==23.2.0       # any requirement, sdist, wheel or project folder
# The report is written to pyti-report.json. `python scripts/demo_vm.py` walks a bare guest through
# start, snapshot, change, rollback and stop instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- six==1.16.0; fi
exec .venv/bin/pyti run "$@" --report pyti-report.json
