#!/usr/bin/env bash
# Install libra-node and its DICOM peers on a Debian machine.
#
#   bash scripts/install.sh          node, CPU PyTorch, dcmtk and Orthanc (for the demo)
#   bash scripts/install.sh --test   the same plus dicom3tools, Chromium and the test extras
#
# Python packages go into .venv in the repository root. Debian packages need root.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

debian_packages=(dcmtk orthanc)
# chromium and chromium-driver run the status page test in a headless browser.
[ "$with_tests" = 1 ] && debian_packages+=(dicom3tools chromium chromium-driver openssl)

missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The Debian package starts a system Orthanc on ports 4242/8042; the demo and the tests
    # start their own on free ports, so the system one is stopped to keep those ports free.
    if [[ " ${missing[*]} " == *" orthanc "* ]]; then
        $sudo_cmd service orthanc stop >/dev/null 2>&1 || true
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# PyTorch is pinned so that pip does not pick a newer multi-GB CUDA build. Where the package
# index serves CUDA builds under that version (plain PyPI on Linux does), set
# LIBRA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build.
torch_index_args=()
[ -n "${LIBRA_TORCH_INDEX_URL:-}" ] && torch_index_args=(--index-url "$LIBRA_TORCH_INDEX_URL")
.venv/bin/pip install -q "${torch_index_args[@]}" "torch==${LIBRA_TORCH_VERSION:-2.13.0}"
if [ "$with_tests" = 1 ]; then
    .venv/bin/pip install -q -e ".[test]"
else
    .venv/bin/pip install -q -e .
fi
