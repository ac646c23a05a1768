# Sourced by the arm64 fetchers (fetch-musl-arm64.sh, fetch-arm64-boot.sh): sets APT, an
# apt-get command line with a private configuration under $ARM64_APT_DIR (its own sources
# list and lists, architecture arm64, no dpkg status), for the machine's own Debian mirror and
# release. The machine's apt setup and its architectures stay as they are; apt still checks
# every package against the archive's signed index. `arm64_apt_update` fetches the lists.
# Needs die() from the caller.

# The mirror and keyring: the machine's own Debian sources (debian-mirror.sh); the suite:
# the machine's release (/etc/os-release).
. "$(dirname "${BASH_SOURCE[0]}")/debian-mirror.sh"
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n "$suite" ]] || die "no VERSION_CODENAME in /etc/os-release: which Debian release is this?"

apt=$ARM64_APT_DIR
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
echo "deb [arch=arm64 signed-by=$keyring] $mirror $suite main" > "$apt/sources.list"
APT=(apt-get -q
  -o "APT::Architecture=arm64"
  -o "APT::Architectures::=arm64"
  -o "Dir::Etc::SourceList=$apt/sources.list"
  -o "Dir::Etc::SourceParts=/nonexistent"
  -o "Dir::State::Lists=$apt/lists"
  -o "Dir::State::Status=/dev/null"
  -o "Dir::Cache=$apt/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root")

arm64_apt_update() {
  "${APT[@]}" update >/dev/null || die "apt-get update of the private arm64 list failed"
}
