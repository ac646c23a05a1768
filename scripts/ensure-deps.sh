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

if [[ -L node_modules ]]; then
  # A link to another checkout's packages (a git worktree): installing here would replace
  # that checkout's node_modules, so only say when it is older than this lock file.
  if [[ package-lock.json -nt node_modules/.package-lock.json ]]; then
    echo "vdboot: node_modules links to $(readlink -f node_modules), installed from an older package-lock.json than this one;" >&2
    echo "        run npm ci there, or replace the link: rm node_modules && npm ci" >&2
  fi
elif [[ ! -d node_modules || package-lock.json -nt node_modules/.package-lock.json ]]; then
  # npm ci installs exactly the locked versions (the lock lists every platform's optional
  # packages) and writes node_modules/.package-lock.json, so the next run does nothing.
  echo "vdboot: installing npm packages (npm ci: the versions in package-lock.json)"
  npm ci --no-audit --no-fund --loglevel=error
fi

# Debian 12's 6.12 kernel (ntfs3, compressed modules), unpacked beside the installed 6.1 for
# the tests that run on both kernels: .cache/kernels/RELEASE (nothing is installed).
bash scripts/fetch-kernel.sh >/dev/null
