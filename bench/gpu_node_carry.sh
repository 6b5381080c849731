#!/usr/bin/env bash
# `make bench-gpu-node-carry`: what bench/gpu_node_e2e.sh needs on the GPU node and cannot fetch there
# (nothing outside that machine can be reached), gathered here into .cache/gpu-node/ (ignored by git;
# a device call names it in `carry`, with .whl/ for the training wheels):
#   debs/          Debian 12's sshd, ssh + ssh-keygen, pdsh and rsync with the libraries the Ubuntu 24.04
#                  node lacks (bench/results/h200_*_probe.txt: sshd needs libwrap0, libnsl2, libtirpc3)
#   wheels/        the controller's Python side: ansible-core and what it needs, ansible-runner (the
#                  dsmesh API runs the playbooks through it), mitogen (ansible.cfg's strategy), rich
#                  (dsmesh's status lines), for CPython 3.12 (the node) and 3.11 (the lab's container mock)
#   collections/   community.general and community.crypto, the collections site.yml names, taken whole
#                  from the pinned `ansible` bundle in .venv instead of the 470 MB bundle
# Everything is pinned: the versions below are requirements.txt's and the .venv's. Re-running it
# only fetches what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/gpu-node
PY=.venv/bin/python
mkdir -p "$DEST/debs" "$DEST/wheels" "$DEST/collections"

# Debian 12 (bookworm) packages, at the versions the probes ran on the node.
DEBS=(
  openssh-server=1:9.2p1-2+deb12u10 openssh-client=1:9.2p1-2+deb12u10 openssh-sftp-server=1:9.2p1-2+deb12u10
  libwrap0=7.6.q-32 libnsl2=1.3.0-2 libtirpc3=1.3.3+ds-1
  pdsh=2.34-0.2 libgenders0=1.22-1+b5 genders=1.22-1+b5
  rsync=3.5.0+ds1-0+deb12u1 libpopt0=1.19+dfsg-1 libxxhash0=0.8.1-1
)
missing=()
for pin in "${DEBS[@]}"; do
  name=${pin%%=*} version=${pin#*=}
  # apt-get download names files NAME_VERSION_ARCH.deb with the epoch's ':' as %3a (or dropped)
  compgen -G "$DEST/debs/${name}_*${version#*:}_amd64.deb" >/dev/null || missing+=("$pin")
done
if ((${#missing[@]})); then
  (cd "$DEST/debs" && apt-get download "${missing[@]}")
fi

# Controller wheels: the pins of requirements.txt / pyproject.toml and of the .venv they resolve to.
WHEELS=(
  ansible-core==2.19.14 resolvelib==1.2.1 jinja2==3.1.6 markupsafe==3.0.4 pyyaml==6.0.3 packaging==26.4
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  ansible-runner==2.4.3 pexpect==4.9.0 ptyprocess==0.7.0 python-daemon==3.1.2 lockfile==0.12.2
  mitogen==0.3.54 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
)
for version in 3.12 3.11; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" "${WHEELS[@]}" 2> >(grep -v "is neither a file nor a directory" >&2)
done

# The collections site.yml's roles name (grep -r 'community\.' roles): community.general (the job stages'
# filetree lookup, the pdsh role's archive) and community.crypto (ssh_mesh's openssh_keypair: Ansible
# resolves every task of site.yml when it loads it, whatever --tags run), as the pinned bundle ships
# them (their MANIFEST.json names the version); gzip, which every machine's tar reads.
for collection in community.general community.crypto; do
  namespace=${collection%%.*} name=${collection#*.}
  root=$("$PY" -c "import os, ansible_collections.$collection as c; print(os.path.dirname(os.path.dirname(list(c.__path__)[0])))")
  version=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["collection_info"]["version"])' \
    "$root/$namespace/$name/MANIFEST.json")
  archive=$DEST/collections/$namespace-$name-$version.tar.gz
  if [[ ! -s $archive ]]; then
    rm -f "$DEST/collections/$namespace-$name-"*.tar.gz
    tar -C "$root" --exclude=__pycache__ -czf "$archive.tmp" "$namespace/$name"
    mv "$archive.tmp" "$archive"
  fi
done

du -sh "$DEST"/* .whl 2>/dev/null
echo "carry total (with .whl/): $(du -cb "$DEST" .whl | tail -1 | cut -f1) bytes"
