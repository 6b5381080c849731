#!/usr/bin/env bash
# `make test`: shellcheck over every shell script, ruff and ansible-lint (production profile), the molecule
# scenarios, and pytest (unit tests, the training package's real multi-process runs, site.yml and
# the whole job on container labs). Stops at the first failing stage. `scripts/test.sh STAGE...`
# runs only the stages named (shellcheck, lint, molecule, pytest); SCENARIOS="a b" limits
# molecule, PYTEST_ARGS adds pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
# compiled files go under .cache, not next to the sources that are copied to the nodes
export PYTHONPYCACHEPREFIX=$PWD/.cache/pycache
source scripts/podman-env.sh
stages=${*:-shellcheck lint molecule pytest}
stage() { printf '\n==== %s (%s)\n' "$*" "$(date +%T)"; }
# Every shell script of the checkout (tracked or new, not ignored): *.sh and anything with a sh
# or bash shebang.
shell_scripts() {
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -f $f ]] || continue
    if [[ $f == *.sh ]] || head -n 1 "$f" 2>/dev/null | grep -qE '^#!.*\b(ba)?sh\b'; then printf '%s\n' "$f"; fi
  done
}

if [[ " $stages " == *" shellcheck "* ]]; then
  stage "shellcheck"
  mapfile -t scripts < <(shell_scripts)
  shellcheck --external-sources "${scripts[@]}"
  echo "shellcheck: ${#scripts[@]} scripts clean"
fi

stage "node image"
bash scripts/lab.sh image
DSMESH_NODE_IMAGE=$(bash scripts/lab.sh image-name)
export DSMESH_NODE_IMAGE

for s in $stages; do
  case $s in
    shellcheck) ;;
    lint)
      stage "ruff (one Python dialect: Python 3.10, the oldest node Python)"
      ruff check --no-cache .
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
      # Two workers (pytest-xdist), each running a whole module at a time (a lab or a launch is a
      # module-scoped fixture), the long modules first (tests/conftest.py): 18 minutes instead of 27
      # in one process on the 2-core CI machine, the labs' waits overlapping the other worker's work.
      # PYTEST_ARGS=-n0 runs one process.
      # shellcheck disable=SC2086 # PYTEST_ARGS holds several arguments
      # the slowest tests at the end: make test must stay under 30 minutes on the 2-core CI machine
      python -m pytest -p no:cacheprovider -q -rs --durations=25 -n 2 --dist loadscope --no-loadscope-reorder \
        ${PYTEST_ARGS:-} tests ;;
    *) echo "unknown stage: $s (shellcheck, lint, molecule, pytest)" >&2; exit 2 ;;
  esac
done
stage "done"
