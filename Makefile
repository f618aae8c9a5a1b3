# Testbed: two commands for a user (make demo, make test); the rest are parts of them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
IMAGE := images/guest/build/manifest.json
IMAGE_INPUTS := images/guest/build.sh images/guest/init $(wildcard images/guest/agent/*)
PYTEST_ARGS ?=

.PHONY: all setup system venv image demo test test-slow bench lint clean

all: setup image

## system packages (QEMU 10 from bookworm-backports, sshd, busybox, ...); idempotent
system:
	@if [ "$$(id -u)" = 0 ]; then bash scripts/setup-system.sh; \
	 else echo "make: not root: skipping system packages (lab tests will skip)"; fi

## the virtualenv with the testbed and its test tools
$(STAMP): pyproject.toml | system
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(STAMP)
setup: system venv

## the guest image: cloud kernel + busybox initramfs + the C guest agent (cached by content)
$(IMAGE): $(IMAGE_INPUTS) | system
	bash images/guest/build.sh images/guest/build

image: $(IMAGE)

demo: setup image
	$(VENV)/bin/testbed demo

test: setup image
	$(VENV)/bin/ruff check testbed tests
	$(VENV)/bin/mypy testbed
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup image
	$(VENV)/bin/python -m pytest -m slow $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check testbed tests
	$(VENV)/bin/mypy testbed

clean:
	rm -rf images/guest/build $(VENV) .pytest_cache .mypy_cache .ruff_cache
