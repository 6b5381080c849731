#!/usr/bin/env bash
# `make bench-launch`: see bench/launch.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH ANSIBLE_CONFIG=$PWD/ansible.cfg PYTHONUNBUFFERED=1
source scripts/podman-env.sh
exec python bench/launch.py
