#!/usr/bin/env bash
# Fetches what an arm64 boot test needs beside build/init-aarch64: Debian's arm64 kernel (the
# package linux-image-arm64 points at, with its modules and depmod's index) and Debian's
# static busybox for arm64, unpacked into .cache/arm64-boot/ through the private apt
# configuration of scripts/arm64-apt.sh (nothing is installed; the machine's apt setup stays
# as it is). Prints two lines: "vmlinuz PATH" and "busybox PATH". Safe to run again: it does
# nothing when both are there.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$ROOT/.cache/arm64-boot

die() { echo "fetch-arm64-boot: $*" >&2; exit 1; }

found() {
  local k
  k=$(ls "$CACHE"/kernel/boot/vmlinuz-* 2>/dev/null | head -1 || true)
  [[ -n "$k" && -f "$CACHE/kernel/lib/modules/${k##*/vmlinuz-}/modules.dep" && -x "$CACHE/busybox/bin/busybox" ]] || return 1
  echo "vmlinuz $k"
  echo "busybox $CACHE/busybox/bin/busybox"
}
found && exit 0

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
found && exit 0

ARM64_APT_DIR=$CACHE/apt
# shellcheck source=arm64-apt.sh
source "$ROOT/scripts/arm64-apt.sh"
arm64_apt_update
pkg=$(apt-cache "${APT[@]:1}" depends linux-image-arm64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[[ -n "$pkg" ]] || die "the arm64 lists name no kernel for linux-image-arm64"
release=${pkg#linux-image-}
echo "fetch-arm64-boot: downloading $pkg and busybox-static (arm64) from $mirror ($suite)" >&2
scratch=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && "${APT[@]}" download "$pkg:arm64" busybox-static:arm64 >/dev/null) || die "apt-get download $pkg:arm64 busybox-static:arm64 failed"
dpkg-deb -x "$scratch"/linux-image-*.deb "$scratch/kernel"
dpkg-deb -x "$scratch"/busybox-static_*.deb "$scratch/busybox"
[[ -f "$scratch/kernel/boot/vmlinuz-$release" ]] || die "$pkg holds no boot/vmlinuz-$release"
depmod -b "$scratch/kernel" "$release"
rm -rf "$CACHE/kernel" "$CACHE/busybox"
mv "$scratch/kernel" "$CACHE/kernel"
mv "$scratch/busybox" "$CACHE/busybox"
found
