#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite: lint, types, tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not qemu"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
