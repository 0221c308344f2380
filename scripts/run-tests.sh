#!/usr/bin/env bash
# The test command: set up (idempotent), lint, then the whole suite against real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
ruff check .
ruff format --check .
smol-kernel doctor || true
# Two workers, a test file each (module-scoped VMs stay shared): a VM under TCG keeps one
# core busy, and much of a test is waiting on one.
exec python3 -m pytest -q -n 2 --dist loadfile --durations=10 "$@"
