# Entry points. `make demo` and `make test` are the two the README promises; every target
# depends on `setup`, which is cheap once done.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
NODES ?= 2
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# podman's settings live in .state/podman (see scripts/podman-env.sh)
PODMAN_ENV := source scripts/podman-env.sh

.PHONY: setup lab lab-down demo test test-unit lint molecule bench-provision clean

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

test-unit: setup
	python -m pytest -q tests/unit

lint: setup
	ansible-lint --profile production

molecule: setup
	@$(PODMAN_ENV); for s in $${SCENARIOS:-$$(ls molecule)}; do molecule test -s $$s; done

bench-provision: setup
	@bash bench/provision.sh

clean: lab-down
	rm -rf .state render out
