# nitroconv — one entry point for people and CI. Every target installs what it needs first.
SHELL := /bin/bash
STATE ?= $(or $(NITROCONV_STATE_DIR),$(CURDIR)/.state)
export NITROCONV_STATE_DIR := $(STATE)
export NITROCONV_BLOBS_DIR ?= $(STATE)/blobs
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=
# The suite waits on QEMU boots, sweeps and time limits more than it computes: two processes share the cores.
TEST_WORKERS ?= 2

.PHONY: setup apt venv blobs emulator test demo bench lint clean

setup: apt venv blobs runtime emulator

# The emulator (QEMU's nitro-enclave machine) and the dev blobs' enclave kernel are built from Debian's
# sources once per machine, into this cache outside the clone (keyed by source version and recipe).
BUILD_CACHE ?= /var/cache/nitroconv
export BUILD_CACHE

apt:
	@deploy/apt-deps.sh

venv: $(VENV)/.installed

# Rebuilt only when the package metadata changes.
$(VENV)/.installed: setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,runtime]'
	@touch $@

# init and the runtime are compiled by the venv's pinned zig (worker/runtime/Makefile).
blobs: apt venv
	@$(MAKE) -s -C deploy/blobs BLOBS=$(NITROCONV_BLOBS_DIR) PYTHON=$(PY) BUILD_CACHE=$(BUILD_CACHE)

# $(STATE)/emulator/qemu-system-x86_64 -> the cached build (deploy/emulator/README.md). Under CI a
# missing emulator fails the build like any other tool; elsewhere boot checks fall back to plain QEMU.
emulator: apt
	@deploy/emulator/build-qemu.sh $(BUILD_CACHE) $(STATE)/emulator || { \
	  if [ "$$CI" = true ]; then echo "emulator: the build failed (CI=true: required)" >&2; exit 1; fi; \
	  echo "emulator: NOT AVAILABLE (the build above failed); boot checks fall back to plain QEMU. Retry: make emulator" >&2; }

# The shim and the launcher the converter puts into images (deploy/runtime/Makefile).
export NITROCONV_RUNTIME_DIR ?= $(STATE)/runtime
.PHONY: runtime
runtime: apt venv
	@$(MAKE) -s -C deploy/runtime RUNTIME=$(NITROCONV_RUNTIME_DIR) PYTHON=$(PY)

test: setup
	@deploy/services.sh --docker
	$(VENV)/bin/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check api worker common tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

demo: setup
	@deploy/services.sh
	@bash deploy/demo.sh

bench: setup
	@deploy/services.sh --docker
	$(PY) bench/run.py

clean:
	rm -rf $(STATE) $(VENV)

.PHONY: up down
up: setup
	@deploy/up.sh

down:
	@deploy/down.sh
