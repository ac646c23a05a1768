#!/usr/bin/env bash
# Fetches musl's C library for arm64 (Debian's musl and musl-dev packages of the machine's
# own suite, architecture arm64) for the aarch64 static /init, and unpacks them into
# .cache/musl-arm64/ with a gcc specs file that makes Debian's cross compiler
# (gcc-aarch64-linux-gnu) link against it, as musl-gcc does for the native build.
# The packages come through a private apt configuration (scripts/arm64-apt.sh): nothing is
# installed, and the machine's apt setup stays as it is.
# Prints the specs file's path. Safe to run again: it does nothing when it is there.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${MUSL_ARM64_CACHE:-$ROOT/.cache/musl-arm64}
SPECS=$CACHE/musl-gcc.specs
TRIPLET=aarch64-linux-musl

die() { echo "fetch-musl-arm64: $*" >&2; exit 1; }

ready() { [[ -f "$SPECS" && -f "$CACHE/root/usr/lib/$TRIPLET/libc.a" && -f "$CACHE/root/usr/include/$TRIPLET/stdio.h" ]]; }
ready && { echo "$SPECS"; exit 0; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
ready && { echo "$SPECS"; exit 0; }

ARM64_APT_DIR=$CACHE/apt
# shellcheck source=arm64-apt.sh
source "$ROOT/scripts/arm64-apt.sh"

echo "fetch-musl-arm64: downloading musl and musl-dev (arm64) from $mirror ($suite)" >&2
arm64_apt_update
scratch=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
(cd "$scratch" && "${APT[@]}" download musl-dev:arm64 musl:arm64 >/dev/null) || die "apt-get download musl-dev:arm64 musl:arm64 failed"
for deb in "$scratch"/*.deb; do dpkg-deb -x "$deb" "$scratch/root"; done
[[ -f "$scratch/root/usr/lib/$TRIPLET/libc.a" ]] || die "musl-dev:arm64 holds no usr/lib/$TRIPLET/libc.a"

# As Debian's musl-gcc.specs, with the unpacked paths (static links only).
lib=$CACHE/root/usr/lib/$TRIPLET
inc=$CACHE/root/usr/include/$TRIPLET
cat > "$scratch/musl-gcc.specs" <<SPECS
%rename cpp_options old_cpp_options

*cpp_options:
-nostdinc -isystem $inc -isystem include%s %(old_cpp_options)

*cc1:
%(cc1_cpu) -nostdinc -isystem $inc -isystem include%s

*link_libgcc:
-L$lib -L .%s

*libgcc:
libgcc.a%s %:if-exists(libgcc_eh.a%s)

*startfile:
%{!shared: $lib/Scrt1.o} $lib/crti.o crtbeginS.o%s

*endfile:
crtendS.o%s $lib/crtn.o

*link:
-nostdlib %{shared:-shared} %{static:-static} %{rdynamic:-export-dynamic}

SPECS
rm -rf "$CACHE/root"
mv "$scratch/root" "$CACHE/root"
mv "$scratch/musl-gcc.specs" "$SPECS"
echo "$SPECS"
