#!/usr/bin/env bash
# The main job: set up (idempotent), install the "Python (smolvm)" kernelspec, and execute
# notebooks/demo.ipynb in a microVM kernel, printing every cell's output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
smol-kernel install --sys-prefix
# A file on the host that the notebook will try (and fail) to read from inside the VM.
echo "this file lives on the host" > /tmp/smol-kernel-demo-host-file.txt
smol-kernel run notebooks/demo.ipynb --kernel smolvm
