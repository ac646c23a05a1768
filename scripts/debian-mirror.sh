# Sourced by the scripts that fetch from Debian through a private apt configuration
# (init/fetch-quickjs.sh, scripts/arm64-apt.sh). Sets:
#   mirror   the first URI of the machine's own Debian sources (deb822 `.sources` files, else the
#            one-line /etc/apt/sources.list), security archives skipped;
#   keyring  Debian's archive keyring, which apt checks every index against.
# The machine's own apt configuration is only read. Needs die() from the caller.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [[ -f "$f" ]] || continue
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
  [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 ~ /^deb(-src)?$/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($i !~ /security/) { print $i; exit } else break } }' /etc/apt/sources.list)
fi
[[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$keyring" ]] || die "$keyring is missing: install the debian-archive-keyring package"
