# nitroconv — one entry point for people and CI. Every target installs what it needs first.
SHELL := /bin/bash
STATE ?= $(or $(NITROCONV_STATE_DIR),$(CURDIR)/.state)
export NITROCONV_STATE_DIR := $(STATE)
export NITROCONV_BLOBS_DIR ?= $(STATE)/blobs
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup apt venv blobs test demo bench lint clean

setup: apt venv blobs runtime

apt:
	@deploy/apt-deps.sh

venv: $(VENV)/.installed

# Rebuilt only when the package metadata changes.
$(VENV)/.installed: setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

blobs: apt
	@$(MAKE) -s -C deploy/blobs BLOBS=$(NITROCONV_BLOBS_DIR)

# The shim and the launcher the converter puts into images (deploy/runtime/Makefile).
export NITROCONV_RUNTIME_DIR ?= $(STATE)/runtime
.PHONY: runtime
runtime: apt
	@$(MAKE) -s -C deploy/runtime RUNTIME=$(NITROCONV_RUNTIME_DIR)

test: setup
	@deploy/services.sh --docker
	$(VENV)/bin/pytest $(PYTEST_ARGS)

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
