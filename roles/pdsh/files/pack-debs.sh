#!/usr/bin/env bash
# Runs on the controller. Packs the flat repository's index and FILE... (the .deb files one
# node plan needs) into BUNDLE, the tar that apt-offline.sh installs from on the nodes.
# BUNDLE appears only when complete, and one that holds exactly these files is kept, so runs
# that share the controller's cache, or a run killed while packing, never leave a partial one.
#
#   pack-debs.sh BUNDLE REPO [FILE...]
#
# Prints "packed BUNDLE" when it wrote BUNDLE, "kept BUNDLE" when a complete one was there.
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 BUNDLE REPO [FILE...]" >&2
  exit 2
fi
bundle=$1
repo=${2%/}
shift 2

want=$(printf '%s\n' Packages "$@" | sort)
if [[ -f $bundle ]] && have=$(tar -tf "$bundle" 2>/dev/null | sort) && [[ $have == "$want" ]]; then
  echo "kept $bundle"
  exit 0
fi
tmp=$(mktemp "$bundle.XXXXXX")
trap 'rm -f "$tmp"' EXIT
tar -cf "$tmp" -C "$repo" Packages "$@"
chmod 0644 "$tmp"
mv -f "$tmp" "$bundle"
trap - EXIT
echo "packed $bundle"
