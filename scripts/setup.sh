#!/usr/bin/env bash
# Install everything smol-kernel needs on a fresh Debian bookworm machine (idempotent):
# Debian packages, the Python package with its test extras, and the default guest image.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v passt >/dev/null || need+=(passt)  # network=True kernels
command -v ip >/dev/null || need+=(iproute2)  # the network tests' namespace test host
command -v chromium >/dev/null || need+=(chromium)  # the JupyterLab browser test (playwright)
command -v skopeo >/dev/null || need+=(skopeo)  # OCI layouts as a real tool writes them (tests)
command -v fakeroot >/dev/null || need+=(fakeroot)  # image build --from-oci without root
if ! command -v configurable-http-proxy >/dev/null && ! command -v npm >/dev/null; then
    need+=(npm)  # JupyterHub's proxy comes from npm
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v configurable-http-proxy >/dev/null; then
    echo "setup: installing configurable-http-proxy (npm) for the JupyterHub test"
    $SUDO npm install -g --silent configurable-http-proxy >/dev/null
fi

echo "setup: installing smol-kernel (pip, editable, with test extras)"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"

echo "setup: building the default guest image (skipped when up to date)"
smol-kernel image build
echo "setup: building the scipy guest image (numpy, pandas, matplotlib, scipy; skipped when up to date)"
smol-kernel image build --preset scipy
