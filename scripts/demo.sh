#!/usr/bin/env bash
# `make demo`: the whole mission on a local 2-node container lab. site.yml takes the nodes from
# "root with a password" to a passwordless SSH mesh with pdsh, puts the training environment,
# a tiny Qwen2 and its dataset on both nodes, runs the preflight and launches a ZeRO-3 job with
# `deepspeed --hostfile` on the master; this script then follows it with `dsmesh status --follow`
# (a live progress bar on a terminal, a line per change otherwise), which ends with the job's
# summary and exits 0 only when the job finished.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
source scripts/podman-env.sh
NODES=${NODES:-2}
INVENTORY=inventory/lab/hosts.yml

bash scripts/lab.sh up "$NODES"
started=$SECONDS
ansible-playbook site.yml

echo
echo "== following the job: dsmesh status --follow"
# The checkout's environment runs the command as a module; `pip install .` installs it as `dsmesh`.
python -m dsmesh status -i "$INVENTORY" --follow --interval 3 || {
  echo "The job did not finish; its output: python -m dsmesh logs -i $INVENTORY" >&2
  exit 1
}
echo
echo "Finished $((SECONDS - started)) s after the start of site.yml."
echo "Logs: dsmesh logs -i $INVENTORY   Status: dsmesh status -i $INVENTORY   Remove the lab: make lab-down"
