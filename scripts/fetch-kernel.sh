#!/usr/bin/env bash
# Fetches a Debian kernel package that is not installed on this machine — by default the
# 6.12 kernel Debian 12 ships beside its 6.1 (meta-package linux-image-6.12-amd64) — and
# unpacks it into .cache/kernels/RELEASE/ (boot/vmlinuz-RELEASE, lib/modules/RELEASE with
# depmod's index), where the tests and `vdboot mkinitramfs --kernel DIR/boot/vmlinuz-RELEASE`
# find it. Nothing is installed: the machine's /boot and /lib/modules stay as they are.
# Prints the vmlinuz path. Safe to run again: it does nothing when the kernel is unpacked.
set -euo pipefail

META=${1:-linux-image-6.12-amd64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$ROOT/.cache/kernels

die() { echo "fetch-kernel: $*" >&2; exit 1; }

# The versioned package the meta-package points at (linux-image-6.12.N+deb12-amd64).
pkg=$(apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [[ -z "$pkg" ]]; then
  [[ $(id -u) -eq 0 ]] && apt-get update -q >/dev/null && pkg=$(apt-cache depends "$META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
fi
[[ -n "$pkg" ]] || die "apt knows no package $META (run apt-get update, or check the machine's Debian sources)"
release=${pkg#linux-image-}
dir=$CACHE/$release
vmlinuz=$dir/boot/vmlinuz-$release
if [[ -f "$vmlinuz" && -f "$dir/lib/modules/$release/modules.dep" ]]; then echo "$vmlinuz"; exit 0; fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
if [[ ! -f "$vmlinuz" || ! -f "$dir/lib/modules/$release/modules.dep" ]]; then
  echo "fetch-kernel: downloading $pkg" >&2
  scratch=$(mktemp -d "$CACHE/.fetch.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  # apt's sandbox user cannot write into a root-owned folder: say so to apt, not an error.
  (cd "$scratch" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) || die "apt-get download $pkg failed"
  deb=$(ls "$scratch"/*.deb)
  # apt-get download checks the package against the archive's signed index.
  dpkg-deb -x "$deb" "$scratch/root"
  depmod -b "$scratch/root" "$release"
  [[ -f "$scratch/root/boot/vmlinuz-$release" ]] || die "$pkg holds no boot/vmlinuz-$release"
  rm -rf "$dir"
  mv "$scratch/root" "$dir"
fi
echo "$vmlinuz"
