#!/usr/bin/env bash
# `make test`: pytest (unit, training and lab tests), ansible-lint (production profile) and the
# molecule scenarios. Stops at the first failing stage.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
source scripts/podman-env.sh
stage() { printf '\n==== %s\n' "$*"; }

stage "node image"
bash scripts/lab.sh image
export DSMESH_NODE_IMAGE=$(bash scripts/lab.sh image-name)

stage "ansible-lint (production profile)"
ansible-lint --profile production --nocolor

stage "molecule"
for scenario in ${SCENARIOS:-$(ls molecule)}; do
  [[ -f molecule/$scenario/molecule.yml ]] || continue
  stage "molecule test -s $scenario"
  molecule test -s "$scenario"
done

stage "pytest"
python -m pytest -p no:cacheprovider -q -rs tests
