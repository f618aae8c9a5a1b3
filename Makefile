# Testbed: two commands for a user (make demo, make test); the rest are parts of them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
IMAGE := images/guest/build/manifest.json
IMAGE_INPUTS := images/guest/build.sh images/guest/init $(wildcard images/guest/agent/*)
PYTEST_ARGS ?=

.PHONY: all setup system venv image host-image setup-host-image setup-vagrant vagrant-box vagrant-lab vagrant-lab-down demo test test-slow scenarios experiments bench bench-convergence bench-wan lint clean

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

## the nested hosts' image (Debian 12 + QEMU + the host agent + the guest image; cached by content,
## the script itself decides whether it is up to date), and what it needs to build (debootstrap)
setup-host-image: system
	@command -v debootstrap >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }

host-image: setup venv image setup-host-image
	@if [ "$$(id -u)" = 0 ]; then bash images/host/build.sh images/host/build; \
	 else echo "make: not root: skipping the host image (nested-host tests will skip)"; fi

## the Vagrant lab: vagrant + vagrant-libvirt from Debian, and a box made from the host image
setup-vagrant: system
	bash scripts/setup-vagrant.sh

vagrant-box: host-image setup-vagrant
	bash images/host/vagrant-box.sh images/host/build images/host/build/testbed-host.box

## the Vagrant lab from nothing: the box added, a libvirtd (the running one, or one started for it), the
## domain type from the KVM probe, `vagrant up`, `testbed lab attach --vagrant`; -down stops all of it
vagrant-lab: vagrant-box
	$(VENV)/bin/testbed lab vagrant up

vagrant-lab-down: venv
	$(VENV)/bin/testbed lab vagrant down

demo: setup image
	$(VENV)/bin/testbed demo

test: setup image host-image
	$(VENV)/bin/ruff check testbed tests
	$(VENV)/bin/mypy testbed
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup image
	$(VENV)/bin/python -m pytest -m slow --timeout 3600 $(PYTEST_ARGS)

## every shipped scenario, its report in reports/NAME/ (report.html, report.json)
scenarios: setup image
	@set -e; for f in scenarios/*.yaml; do n=$$(basename $$f .yaml); \
	  $(VENV)/bin/testbed scenario run $$f --report reports/$$n; done

## the long-distance experiments (docs/long-distance.md): tables, JSON and SVG charts
experiments: setup image
	for e in downtime-vs-rtt streams disk-mirror; do $(VENV)/bin/testbed experiment $$e \
	  --json docs/long-distance/$$e.json --chart docs/long-distance/$$e.svg; done

## the engine against libvirt's live migration, 5 runs per workload (about 7 min; table in docs/benchmarks.md)
bench: setup image
	COLUMNS=200 $(VENV)/bin/testbed bench --runs 5 --json bench-libvirt.json --markdown bench-libvirt.md

## the convergence controllers side by side, then issue 14's pair 10 times each (about 20 min + an estimated 15 min, not yet timed; tables in docs/benchmarks.md)
bench-convergence: setup image
	COLUMNS=250 $(VENV)/bin/testbed bench convergence --runs 2 --allow-postcopy --json convergence.json
	COLUMNS=250 $(VENV)/bin/testbed bench convergence --runs 10 --link 30MiB/s --vm-memory 256M \
	  --vm-disk 128M --modes sdps,adaptive --workloads open-loop,cpu-bound --allow-postcopy \
	  --json convergence-30MiB.json

## the delay line's own benchmark (RTT accuracy, throughput; docs/long-distance.md)
bench-wan: setup
	$(VENV)/bin/testbed bench wan

lint: venv
	$(VENV)/bin/ruff check testbed tests
	$(VENV)/bin/mypy testbed

clean:
	rm -rf images/guest/build $(VENV) .pytest_cache .mypy_cache .ruff_cache reports
