#!/usr/bin/env bash
# Prints RELEASE-ARCHITECTURE (debian-bookworm-amd64: os-release's ID and codename, dpkg's
# architecture): what a node runs, or what this machine's apt can provide packages for; an empty
# line without apt-get and dpkg. With --package NAME, a second line: NAME's dpkg status
# ("install ok installed"), empty when it is not installed.
#
#   platform.sh [--package NAME]
set -uo pipefail
package=''
if (($#)); then
  [[ $1 == --package && $# == 2 ]] || { echo "usage: $0 [--package NAME]" >&2; exit 2; }
  package=$2
fi
platform=''
if [[ -r /etc/os-release ]] && command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  # shellcheck disable=SC1091 # the running system's os-release
  platform=$(. /etc/os-release && printf '%s-%s' "${ID:-}" "${VERSION_CODENAME:-}")-$(dpkg --print-architecture)
fi
echo "$platform"
if [[ -n $package ]]; then
  dpkg-query --show --showformat '${Status}' "$package" 2>/dev/null || true
  echo
fi
