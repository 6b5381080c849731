#!/usr/bin/env bash
# `make bench-resume`: see bench/resume.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests/integration
source scripts/podman-env.sh
exec python bench/resume.py
