#!/usr/bin/env bash
# `make demo`: a 2-node container lab taken from "root with a password" to a passwordless SSH
# mesh with pdsh by site.yml, then shown working from the master.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg
source scripts/podman-env.sh
NODES=${NODES:-2}

bash scripts/lab.sh up "$NODES"
ansible-playbook site.yml
master=$(python3 -c 'import yaml; print(next(iter(yaml.safe_load(open("inventory/lab/hosts.yml"))["all"]["children"]["master"]["hosts"])))')
echo
echo "== from $master: pdsh -a over the mesh"
podman exec "$master" pdsh -a 'echo "$(hostname): $(sshd -T | grep ^passwordauthentication)"' | sort
echo
echo "Done. Nodes: $(podman ps --filter label=dsmesh.lab=1 --format '{{.Names}}' | sort | tr '\n' ' ')"
echo "Inventory: inventory/lab/hosts.yml   Remove the lab with: make lab-down"
