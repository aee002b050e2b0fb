#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run pyti's main job end to end on a real guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo_vm.py "$@"
