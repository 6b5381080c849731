#!/usr/bin/env bash
# Runs on a node, as root: apt with a flat repository of the controller's packages as its only
# source (a temporary folder; the node's own sources, lists and caches are never read or
# touched, and no network is used). The index is apt's own record from the controller, so apt
# checks every file's SHA256; trusted=yes only waives the signature a flat repository lacks.
#
#   apt-offline.sh plan [--host NAME] [--hint TEXT] PACKAGE...
#       The index (a Packages file) comes in $DSMESH_APT_INDEX. apt simulates installing
#       PACKAGE... against the node's own dpkg status and prints what it would install, one
#       "NAME VERSION" line each: the files the node has to be sent. Exit 1 (apt's words, then
#       TEXT) when the packages do not fit the node.
#   apt-offline.sh install BUNDLE PACKAGE...
#       Installs PACKAGE... from BUNDLE (a tar of the index and the .deb files), then removes it.
set -euo pipefail
usage() { echo "usage: $0 plan [--host NAME] [--hint TEXT] PACKAGE... | install BUNDLE PACKAGE..." >&2; exit 2; }
(($# >= 2)) || usage
mode=$1
shift

work=$(mktemp -d /var/tmp/dsmesh-apt.XXXXXX)
cleanup=("$work")
trap 'rm -rf "${cleanup[@]}"' EXIT
mkdir "$work/repo" "$work/sources.list.d" "$work/lists"
echo "deb [trusted=yes] file:$work/repo ./" >"$work/sources.list"
# Root reads the repository: apt's _apt user cannot enter mktemp's private folder.
local_apt() {
  apt-get -q -o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts="$work/sources.list.d" \
    -o Dir::State::Lists="$work/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
    -o APT::Sandbox::User=root "$@"
}

case $mode in
  plan)
    host=$(hostname) hint=''
    while (($#)); do
      case $1 in
        --host) host=$2; shift 2 ;;
        --hint) hint=$2; shift 2 ;;
        *) break ;;
      esac
    done
    (($#)) || usage
    [[ -n ${DSMESH_APT_INDEX:-} ]] || { echo "apt-offline: DSMESH_APT_INDEX holds no index" >&2; exit 2; }
    printf '%s\n' "$DSMESH_APT_INDEX" >"$work/repo/Packages"
    local_apt -qq update
    if ! plan=$(local_apt install --simulate --no-install-recommends "$@"); then
      echo "The controller's packages do not fit $host (apt's words above).${hint:+ $hint}" >&2
      exit 1
    fi
    # "Inst NAME [OLD] (VERSION ...)" -> NAME VERSION
    printf '%s\n' "$plan" | sed -n 's/^Inst \([^ ]*\) \(\[[^]]*\] \)\{0,1\}(\([^ ]*\) .*/\1 \3/p'
    ;;
  install)
    bundle=$1
    shift
    (($#)) || usage
    cleanup+=("$bundle")
    tar -xf "$bundle" -C "$work/repo"
    local_apt -qq update
    DEBIAN_FRONTEND=noninteractive local_apt install -y --no-install-recommends "$@"
    ;;
  *) usage ;;
esac
