#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine, as root:
# the apt packages (podman and friends, pdsh, a compiler for DeepSpeed's ops) and the
# Python environment in .venv/. Cheap when already done: each step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

APT_PACKAGES=(podman runc debootstrap fuse-overlayfs slirp4netns uidmap netavark aardvark-dns
  containernetworking-plugins pdsh rsync sshpass openssh-client python3-venv python3-dev
  build-essential git ca-certificates shellcheck)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# pdsh and its dependencies for nodes of this machine's release (the lab's nodes): the pdsh role
# copies them from this cache (its pdsh_controller_cache_dir), so no node ever needs a mirror
# and the tests and benchmarks stay off the network. Cheap once done; delete the folder to refresh.
platform=$(bash roles/pdsh/files/platform.sh)
PDSH_DEBS=${XDG_CACHE_HOME:-$HOME/.cache}/dsmesh/debs/$platform/pdsh
if [[ ! -f $PDSH_DEBS/Packages ]]; then
  echo "setup: downloading pdsh's packages for the nodes into $PDSH_DEBS"
  bash roles/pdsh/files/fetch-debs.sh "$PDSH_DEBS" pdsh >/dev/null ||
    echo "setup: could not download pdsh's packages; site.yml tries again when a node lacks pdsh" >&2
fi

# The venv uses Debian's python3 (not a pyenv build) so that the lab's Debian nodes can run
# the very same environment when it is mounted into them at the same path.
VENV=$ROOT/.venv
# This checkout is the collection dsmesh.cluster: linked into the venv's ansible_collections, Ansible
# finds its roles and modules by name, and Python code imports its module_utils by the same path.
link_collection() {
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/ansible_collections/dsmesh"
  ln -sfn "$ROOT" "$site/ansible_collections/dsmesh/cluster"
  # the dsmesh command from the checkout (no `pip install .` here: pip would write through the link)
  # shellcheck disable=SC2016 # the wrapper expands them
  printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" -m dsmesh "$@"\n' \
    "$ROOT" "$VENV/bin/python" >"$VENV/bin/dsmesh"
  chmod 755 "$VENV/bin/dsmesh"
}
STAMP=$VENV/.requirements.sha256
want=$(sha256sum requirements.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  link_collection
  exit 0
fi
[[ -x $VENV/bin/python ]] || /usr/bin/python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1 ninja==1.13.0
# torch first, pinned to the CPU build: an open range would pull CUDA wheels.
"${PIP[@]}" "$(grep -E '^torch==' requirements.txt)"
# DeepSpeed is an sdist; build it against that torch, with the shm comm op compiled in so
# nodes without a compiler can run CPU ranks (it is JIT-built at init otherwise).
if ! "$VENV/bin/python" -c 'import deepspeed' 2>/dev/null; then
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${PIP[@]}" --no-build-isolation "$(grep -E '^deepspeed==' requirements.txt)"
fi
"${PIP[@]}" -r requirements.txt
link_collection
echo "$want" >"$STAMP"
echo "setup: .venv ready"
