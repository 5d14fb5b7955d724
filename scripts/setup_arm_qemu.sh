#!/usr/bin/env bash
# Build the emulated ARM device that `vitsparse rpc server --qemu` runs and the tests use:
# an aarch64 Python (Debian's arm64 packages, unpacked, not installed) with the aarch64 wheels
# of the host's apache-tvm, apache-tvm-ffi and numpy, run under qemu-user.
#
#   scripts/setup_arm_qemu.sh [ROOT]    (default: $VITSPARSE_ARM_ROOT, else .cache/arm-qemu)
#
# ROOT/sysroot   arm64 libc, libstdc++ and python3.X, unpacked with dpkg -x
# ROOT/site      the aarch64 wheels (pip install --target, --platform manylinux aarch64)
# ROOT/bin/python3   runs ROOT/sysroot's python under qemu-aarch64-static with ROOT/site
# ROOT/READY     the versions it was built for; a ROOT whose READY matches is reused as is
#
# The root is built in ROOT.partial and renamed when it works, so a failed run leaves no half
# root. Needs apt (arm64 packages, qemu-user-static) and root to install missing packages; pip
# reaches the package index. Always exits 0: when something is missing it says what, and the
# tests that need the device skip with that reason.
set -u

here="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${1:-${VITSPARSE_ARM_ROOT:-$here/.cache/arm-qemu}}"
PYTHON="${PYTHON:-python3}"
PARTIAL="$ROOT.partial"

skip() {
    echo "setup_arm_qemu: not set up: $*"
    rm -rf "$PARTIAL"
    exit 0
}

versions=$("$PYTHON" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in ("apache-tvm", "apache-tvm-ffi", "numpy")))
EOF
) || skip "$PYTHON has no apache-tvm, apache-tvm-ffi and numpy to match (run make install)"

if [ -f "$ROOT/READY" ] && [ "$(cat "$ROOT/READY")" = "$versions" ]; then
    echo "setup_arm_qemu: ready at $ROOT ($versions)"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || skip "no apt-get: this script needs Debian/Ubuntu arm64 packages"
as_root() {
    if [ "$(id -u)" -ne 0 ]; then
        skip "not root; cannot $*. Run: sudo $0 $ROOT"
    fi
}

if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    as_root "install qemu-user-static"
    echo "setup_arm_qemu: installing qemu-user-static"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-user-static \
        || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
            --no-install-recommends qemu-user-static; } \
        || skip "apt-get could not install qemu-user-static"
fi

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    as_root "add the arm64 architecture to apt"
    echo "setup_arm_qemu: adding the arm64 architecture to apt (packages are downloaded, not installed)"
    dpkg --add-architecture arm64 || skip "dpkg --add-architecture arm64 failed"
    apt-get update || skip "apt-get update failed after adding arm64"
fi

# Debian's python3 for arm64 names the interpreter (python3.11 on bookworm).
pyver=$(apt-cache depends python3-minimal:arm64 2>/dev/null | grep -o 'python3\.[0-9]*' | head -1)
[ -n "$pyver" ] || skip "apt has no python3-minimal:arm64 (apt-get update?)"

# The interpreter's runtime closure, arm64 packages only (tools such as dpkg and tar are not run).
packages=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$pyver:arm64" libstdc++6:arm64 2>/dev/null \
    | grep -E '^[a-z0-9][^ <]*:arm64$' | grep -vE '^(dpkg|tar|install-info|perl[^:]*):' | sort -u)
[ -n "$packages" ] || skip "apt-cache could not list the dependencies of $pyver:arm64"

rm -rf "$PARTIAL"
mkdir -p "$PARTIAL/debs" "$PARTIAL/sysroot" "$PARTIAL/site" "$PARTIAL/bin"
echo "setup_arm_qemu: downloading $(echo "$packages" | wc -l) arm64 packages for $pyver"
# shellcheck disable=SC2086 # one word per package
(cd "$PARTIAL/debs" && apt-get download $packages >/dev/null) \
    || skip "apt-get download of the arm64 packages failed"
for deb in "$PARTIAL"/debs/*.deb; do
    dpkg -x "$deb" "$PARTIAL/sysroot" || skip "dpkg -x $deb failed"
done
rm -rf "$PARTIAL/debs"

echo "setup_arm_qemu: installing the aarch64 wheels of $versions"
# cloudpickle and psutil: TVM's RPC server starts its worker with them.
# shellcheck disable=SC2086 # one word per requirement
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$PARTIAL/site" --only-binary=:all: --implementation cp \
    --python-version "${pyver#python}" --platform manylinux2014_aarch64 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    $versions cloudpickle psutil \
    || skip "pip could not install the aarch64 wheels of $versions"

cat >"$PARTIAL/bin/python3" <<EOF
#!/bin/sh
# aarch64 $pyver under qemu-user, with the aarch64 wheels in ../site (setup_arm_qemu.sh)
root="\$(cd "\$(dirname "\$0")/.." && pwd)"
unset PYTHONHOME
PYTHONPATH="\$root/site" PYTHONNOUSERSITE=1 exec qemu-aarch64-static -L "\$root/sysroot" \\
    "\$root/sysroot/usr/bin/$pyver" "\$@"
EOF
chmod +x "$PARTIAL/bin/python3"

machine=$("$PARTIAL/bin/python3" -c 'import platform, tvm; print(platform.machine(), tvm.__version__)') \
    || skip "the aarch64 Python cannot import tvm under qemu"
echo "setup_arm_qemu: smoke test: $machine"

echo "$versions" >"$PARTIAL/READY"
rm -rf "$ROOT"
mv "$PARTIAL" "$ROOT" || skip "could not move $PARTIAL to $ROOT"
echo "setup_arm_qemu: ready at $ROOT ($versions)"
