#!/usr/bin/env bash
# `make test`: ansible-lint (production profile), the molecule scenarios, and pytest (unit tests,
# the training package's real multi-process runs, site.yml and the whole job on container labs).
# Stops at the first failing stage. `scripts/test.sh STAGE...` runs only the stages named
# (lint, molecule, pytest); SCENARIOS="a b" limits molecule, PYTEST_ARGS adds pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
# compiled files go under .cache, not next to the sources that are copied to the nodes
export PYTHONPYCACHEPREFIX=$PWD/.cache/pycache
source scripts/podman-env.sh
stages=${*:-lint molecule pytest}
stage() { printf '\n==== %s (%s)\n' "$*" "$(date +%T)"; }

stage "node image"
bash scripts/lab.sh image
export DSMESH_NODE_IMAGE=$(bash scripts/lab.sh image-name)

for s in $stages; do
  case $s in
    lint)
      stage "ansible-lint (production profile)"
      ansible-lint --profile production --nocolor ;;
    molecule)
      for scenario in ${SCENARIOS:-$(ls molecule)}; do
        [[ -f molecule/$scenario/molecule.yml ]] || continue
        stage "molecule test -s $scenario"
        molecule test -s "$scenario"
      done ;;
    pytest)
      stage "pytest"
      python -m pytest -p no:cacheprovider -q -rs ${PYTEST_ARGS:-} tests ;;
    *) echo "unknown stage: $s (lint, molecule, pytest)" >&2; exit 2 ;;
  esac
done
stage "done"
