#!/usr/bin/env bash
# Install what smol-kernel needs on a fresh Debian bookworm machine (idempotent).
#   bash scripts/setup.sh          the main job: QEMU, the image builder, the Python package
#                                  and the default guest image (what run-demo.sh uses)
#   bash scripts/setup.sh --test   all of that, plus the test stack: passt and iproute2
#                                  (network tests), chromium (browser test), skopeo and
#                                  fakeroot (OCI images), JupyterHub's proxy (npm), the test
#                                  extras, the assistants extra (.venv-assistants) and the
#                                  scipy image
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
if [ "${1:-}" = "--test" ]; then TEST=1; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
if [ "$TEST" = 1 ]; then
    command -v passt >/dev/null || need+=(passt)  # network=True kernels
    command -v ip >/dev/null || need+=(iproute2)  # the network tests' namespace test host
    command -v chromium >/dev/null || need+=(chromium)  # the JupyterLab browser test
    command -v skopeo >/dev/null || need+=(skopeo)  # OCI layouts as a real tool writes them
    command -v fakeroot >/dev/null || need+=(fakeroot)  # image build --from-oci without root
    if ! command -v configurable-http-proxy >/dev/null && ! command -v npm >/dev/null; then
        need+=(npm)  # JupyterHub's proxy comes from npm
    fi
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ "$TEST" = 1 ]; then
    if ! command -v configurable-http-proxy >/dev/null; then
        echo "setup: installing configurable-http-proxy (npm) for the JupyterHub test"
        $SUDO npm install -g --silent configurable-http-proxy >/dev/null
    fi
    echo "setup: installing smol-kernel (pip, editable, with test extras)"
    python3 -m pip install -q --disable-pip-version-check -e ".[test]"
    # jupyter-mcp-server and jupyter-collaboration (tests/test_assistants.py) in a venv of
    # their own: collaboration's server extension would load into every Jupyter server the
    # other tests start
    echo "setup: installing smol-kernel with the assistants extra in .venv-assistants"
    [ -x .venv-assistants/bin/pip ] || python3 -m venv .venv-assistants
    .venv-assistants/bin/pip install -q --disable-pip-version-check -e ".[assistants]"
else
    echo "setup: installing smol-kernel (pip, editable)"
    python3 -m pip install -q --disable-pip-version-check -e .
fi

echo "setup: building the default guest image (skipped when up to date)"
smol-kernel image build
if [ "$TEST" = 1 ]; then
    echo "setup: building the scipy guest image (skipped when up to date)"
    smol-kernel image build --preset scipy
fi
