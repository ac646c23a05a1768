#!/usr/bin/env bash
# Fetches QuickJS's C sources for vdboot's static /init host: Debian's source package
# `quickjs` (the version below, from the trixie suite), downloaded with `apt-get source`
# through a private apt configuration (the machine's own sources and lists stay untouched),
# the orig tarball checked against the SHA-256 in the signed .dsc, then unpacked to
# .cache/quickjs/src. Debian's patches are NOT applied: vdboot builds upstream QuickJS as
# released (the orig tarball), which is what the checksum pins.
# Safe to run again: it does nothing when the sources are already verified and unpacked.
set -euo pipefail

PKG=quickjs
VERSION=2025.04.26
SUITE=trixie
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${QUICKJS_CACHE:-$ROOT/.cache/quickjs}
SRC=$CACHE/src
STAMP=$CACHE/src.verified

die() { echo "fetch-quickjs: $*" >&2; exit 1; }

ready() { [[ -f "$STAMP" && -f "$SRC/quickjs.c" && "$(cat "$STAMP")" == "$PKG $VERSION"* ]]; }
ready && exit 0

# One fetch at a time (parallel builds and test files may all start here).
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
ready && exit 0

# The mirror and keyring: the machine's own Debian sources (scripts/debian-mirror.sh).
. "$ROOT/scripts/debian-mirror.sh"

# apt verifies trixie's InRelease as usual: it carries signatures by the bookworm and the
# trixie archive keys, and bookworm's debian-archive-keyring ships both (checked with
# 2023.3+deb12u2). Verification is never switched off.

mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/cache/archives/partial" "$CACHE/download"
cat > "$CACHE/apt/sources.list" <<SOURCES
deb-src [signed-by=$keyring] $mirror $SUITE main
SOURCES

APT=(apt-get -q
  -o "Dir::Etc::SourceList=$CACHE/apt/sources.list"
  -o "Dir::Etc::SourceParts=/nonexistent"
  -o "Dir::State::Lists=$CACHE/apt/lists"
  -o "Dir::Cache=$CACHE/apt/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root")

dsc=$(ls "$CACHE/download/${PKG}_${VERSION}"*.dsc 2>/dev/null | head -1 || true)
if [[ -z "$dsc" ]]; then
  echo "fetch-quickjs: downloading $PKG $VERSION from $mirror ($SUITE)"
  "${APT[@]}" update >/dev/null || die "apt-get update of the private $SUITE deb-src list failed"
  (cd "$CACHE/download" && "${APT[@]}" source --download-only "$PKG" >/dev/null) ||
    die "apt-get source $PKG failed"
  dsc=$(ls "$CACHE/download/${PKG}_${VERSION}"*.dsc 2>/dev/null | head -1 || true)
  [[ -n "$dsc" ]] || die "$SUITE does not have $PKG $VERSION (got: $(ls "$CACHE/download"))"
fi

# The .dsc came through apt's signed Release → Sources chain; the orig tarball is checked
# against the .dsc here, before anything is unpacked.
orig=$(awk '/^Checksums-Sha256:/ { on = 1; next } /^[^ ]/ { on = 0 } on && $3 ~ /\.orig\.tar\./ { print $1, $3 }' "$dsc")
[[ -n "$orig" ]] || die "$dsc lists no orig tarball under Checksums-Sha256"
want=${orig%% *}
file=$CACHE/download/${orig#* }
[[ -f "$file" ]] || die "$file is missing (listed in $dsc)"
got=$(sha256sum "$file" | cut -d' ' -f1)
[[ "$got" == "$want" ]] || die "SHA-256 mismatch for $file: got $got, $dsc says $want. Delete $CACHE and retry."

rm -rf "$SRC" "$SRC.tmp"
mkdir -p "$SRC.tmp"
tar -xf "$file" -C "$SRC.tmp" --strip-components=1
[[ -f "$SRC.tmp/quickjs.c" ]] || die "$file does not contain quickjs.c at its top level"
mv "$SRC.tmp" "$SRC"
echo "$PKG $VERSION $(basename "$file") sha256:$got" > "$STAMP"
echo "fetch-quickjs: $PKG $VERSION verified and unpacked to $SRC"
