#!/usr/bin/env bash
# Runs on the controller. Downloads PACKAGE... with everything they depend on (Depends and
# Pre-Depends, no Recommends), as this machine's apt resolves them for a system with nothing
# installed, so the set holds whatever a node of the same release might lack. Writes them into
# DIR as a flat apt repository: the .deb files and a Packages index made of apt's own records for
# exactly these versions, hashes included. The nodes are sent the files they lack and install
# from them with apt, offline.
#
#   fetch-debs.sh DIR PACKAGE...
#
# Needs network (this machine's apt sources); DIR appears only when complete (an old one is
# replaced).
# Exit status 3: this machine cannot provide the packages (no apt, or they are unknown to it).
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 DIR PACKAGE..." >&2
  exit 2
fi
repo=${1%/}
shift
hint="Set pdsh_install_from: apt to install from the nodes' own apt sources instead."

for tool in apt-get apt-cache dpkg; do
  if ! command -v "$tool" >/dev/null; then
    echo "fetch-debs: the controller has no $tool, so it cannot provide .deb files. $hint" >&2
    exit 3
  fi
done

mkdir -p "$(dirname "$repo")"
work=$(mktemp -d "$(dirname "$repo")/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -m 0755 "$work/repo"

# Every package the install would bring onto an empty system, with its version.
if ! apt-get -s -q --no-install-recommends -o Dir::State::status=/dev/null install "$@" >"$work/plan" 2>&1; then
  echo "fetch-debs: the controller's apt cannot resolve $*:" >&2
  cat "$work/plan" >&2
  echo "Run 'apt-get update' on the controller, or: $hint" >&2
  exit 3
fi
mapfile -t wanted < <(awk '/^Inst / { v = $3; gsub(/[()]/, "", v); print $2 "=" v }' "$work/plan")
if ((${#wanted[@]} == 0)); then
  echo "fetch-debs: apt planned nothing to install for $*. $hint" >&2
  exit 3
fi

# As root, apt would try to drop to its _apt user, who cannot write into this folder.
sandbox=()
[[ $EUID == 0 ]] && sandbox=(-o APT::Sandbox::User=root)
if ! (cd "$work/repo" && apt-get download -q "${sandbox[@]}" "${wanted[@]}" >"$work/download" 2>&1); then
  cat "$work/download" >&2
  echo "fetch-debs: downloading on the controller failed (see above). $hint" >&2
  exit 3
fi

# The index: apt's record of each version (the first where several sources carry it), its
# Filename pointing into this folder. Files are named as in the archive's pool (apt-get download
# writes an epoch's ':' as '%3a').
apt-cache show "${wanted[@]}" | awk 'BEGIN { RS = ""; ORS = "\n\n" }
  { split($0, lines, "\n"); key = ""
    for (i in lines) if (lines[i] ~ /^(Package|Version|Architecture): /) key = key lines[i] "\n"
    if (!(key in seen)) { seen[key] = 1; print } }' >"$work/records"
awk 'BEGIN { RS = "" } {
  n = split($0, lines, "\n")
  for (i = 1; i <= n; i++) {
    if (lines[i] ~ /^Package: /) p = substr(lines[i], 10)
    if (lines[i] ~ /^Version: /) v = substr(lines[i], 10)
    if (lines[i] ~ /^Architecture: /) a = substr(lines[i], 15)
    if (lines[i] ~ /^Filename: /) f = substr(lines[i], 11)
  }
  sub(/.*\//, "", f); gsub(/:/, "%3a", v); print p "_" v "_" a ".deb", f }' "$work/records" |
  while read -r downloaded pool_name; do
    [[ $downloaded == "$pool_name" ]] || mv "$work/repo/$downloaded" "$work/repo/$pool_name"
  done
sed -E 's|^Filename: .*/([^/]+)$|Filename: ./\1|' "$work/records" >"$work/repo/Packages"
if [[ $(grep -c '^Package: ' "$work/repo/Packages") != "${#wanted[@]}" ]]; then
  echo "fetch-debs: apt-cache show did not describe every package of: ${wanted[*]}" >&2
  exit 1
fi

rm -rf "$repo"
mv "$work/repo" "$repo"
echo "fetch-debs: $repo: ${#wanted[@]} packages for $*"
