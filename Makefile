# Entry points. `make demo` and `make test` are the two the README promises; every target
# depends on `setup`, which is cheap once done.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
NODES ?= 2
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: setup lab lab-down demo test lint molecule render bench-provision bench-launch bench-resume bench-gpu \
	bench-gpu-node bench-gpu-node-carry bench-gpu-node-lab clean

setup:
	@bash scripts/setup.sh

lab: setup
	@bash scripts/lab.sh up $(NODES)

lab-down:
	@bash scripts/lab.sh down

demo: setup
	@bash scripts/demo.sh

test: setup
	@bash scripts/test.sh

lint: setup
	ansible-lint --profile production

molecule: setup
	@SCENARIOS="$(SCENARIOS)" bash scripts/test.sh molecule

# The example cluster's hostfile, ds_config.json, .deepspeed_env and launch command, rendered
# on this machine without contacting it.
render: setup
	ansible-playbook playbooks/render.yml -i inventory/example -e render_dir=$(CURDIR)/render

bench-provision: setup
	@bash bench/provision.sh

bench-launch: setup
	@bash bench/launch.sh

# Relaunch to first step with and without converting the checkpoint (lab tiny model, a real shape on the CPU).
bench-resume: setup
	@bash bench/resume.sh

# On the GPU machine (see docs/gpu-benchmarks.md).
bench-gpu:
	@bash bench/gpu.sh

# The job stages against the GPU machine as a one-node cluster (issue 15), run ON it with .whl/ and
# .cache/gpu-node/ carried; bench-gpu-node-carry gathers those here, bench-gpu-node-lab runs the same
# script on CPU ranks in a container that lacks what the GPU machine lacks (~5 minutes on 2 cores).
bench-gpu-node:
	@bash bench/gpu_node_e2e.sh

bench-gpu-node-carry: setup
	@bash bench/gpu_node_carry.sh

bench-gpu-node-lab: setup bench-gpu-node-carry
	@bash bench/gpu_node_lab.sh

clean: lab-down
	rm -rf .state render out
