#!/usr/bin/env bash
# The test command: set up (idempotent), lint, then the whole suite against real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check .
ruff format --check .
smol-kernel doctor || true
exec python3 -m pytest -q --durations=10 "$@"
