#!/usr/bin/env bash
# Installs what vdboot's build and tests need, when it is missing: Debian packages
# (scripts/debian-packages.txt) and npm packages (package-lock.json). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
while read -r pkg _; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < scripts/debian-packages.txt

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "vdboot: missing Debian packages: ${missing[*]}" >&2
    echo "        install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "vdboot: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
  # `npm install --no-save` installs the locked versions like `npm ci`, but also accepts a
  # lock file written without the other platforms' optional packages (esbuild's, rollup's).
  echo "vdboot: installing npm packages (the versions in package-lock.json)"
  npm install --no-save --no-audit --no-fund --loglevel=error
fi
