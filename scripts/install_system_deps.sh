#!/usr/bin/env bash
# Install the system packages vitsparse's cross-compilation targets need:
#   gcc/g++/binutils-aarch64-linux-gnu  -> the 'arm' preset (aarch64-linux-gnu-g++)
#   file                                -> tests check the architecture of exported libraries
# Idempotent: installs only what is missing and runs `apt-get update` at most once.
# Always exits 0; when it cannot install, it says why (the tests then skip with a reason).
# nvcc (the 'cuda' preset) comes from the CUDA toolkit, not from apt, and is not installed here.
set -u

PACKAGES=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu binutils-aarch64-linux-gnu file)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: apt-get/dpkg not found (not a Debian/Ubuntu system);" \
        "install these by other means: ${PACKAGES[*]}"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if is_installed "$pkg"; then
        echo "install_system_deps: skip $pkg (already installed)"
    else
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_system_deps: nothing to install"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_deps: not root; cannot install ${missing[*]}." \
        "Run: sudo $0"
    exit 0
fi

echo "install_system_deps: installing ${missing[*]}"
if ! apt-get update; then
    echo "install_system_deps: apt-get update failed (no network or no apt sources?);" \
        "${missing[*]} not installed"
    exit 0
fi
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; then
    echo "install_system_deps: apt-get install failed; ${missing[*]} not installed"
    exit 0
fi
echo "install_system_deps: installed ${missing[*]}"
exit 0
