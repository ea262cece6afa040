# keel: `make demo` runs the appliance on embedded defaults, `make test` runs
# every test tier. Both set themselves up on a fresh Debian 12 machine (as root
# for the system packages; without root, tiers that need them skip and say so).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed

# What the test tiers need from Debian: nix-bin (tier 4 parse checks),
# debootstrap + systemd-container + openssh-client (tier 3, conformance over
# ssh), nftables + iproute2 + iputils-ping + iptables (tier 2: iptables only
# for the NFQUEUE delay shaper on kernels without netem), libsystemd-dev +
# pkg-config + python3-dev (systemd-python), python3-venv, procps (pgrep in the
# safeswitch tests; not in a minimal Debian 12). Checked on a debootstrap
# --variant=minbase bookworm: everything else the tests run on the host
# (setpriv, nsenter, prlimit, mount, timeout...) is in its required packages.
APT_PACKAGES := python3-venv python3-dev gcc pkg-config libsystemd-dev procps \
	iproute2 iputils-ping iptables nftables debootstrap systemd-container openssh-client nix-bin

.PHONY: help demo test lint typecheck pytest bench system-packages venv clean

help:
	@echo "make demo    run keel on embedded defaults (dev mode, files under ./.keel)"
	@echo "make test    ruff, mypy --strict and every test tier, with a summary"
	@echo "make bench   the benchmarks in bench/ (figures against a same-run baseline)"
	@echo "make clean   remove .venv and ./.keel"

system-packages:
	@missing=(); for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$$p"); \
	done; \
	if [ $${#missing[@]} -gt 0 ]; then \
		if [ "$$(id -u)" -ne 0 ]; then \
			echo "keel: not root, cannot install $${missing[*]}; the tiers that need them will skip" >&2; \
		else \
			echo "keel: installing system packages: $${missing[*]}"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends "$${missing[@]}" >/tmp/keel-apt.log 2>&1 \
			|| { apt-get update -qq >>/tmp/keel-apt.log 2>&1 && \
			     apt-get install -y -qq --no-install-recommends "$${missing[@]}" >>/tmp/keel-apt.log 2>&1; } \
			|| { cat /tmp/keel-apt.log >&2; echo "keel: apt-get install failed (log above)" >&2; exit 1; }; \
		fi; \
	fi

venv: $(STAMP)

$(STAMP): python/pyproject.toml | system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "keel: installing keel and its dev dependencies into $(VENV)"
	@$(BIN)/pip install -q --disable-pip-version-check -e 'python[dev,systemd]' >$(VENV)/pip.log 2>&1 \
		|| { cat $(VENV)/pip.log >&2; echo "keel: pip install failed (log above)" >&2; exit 1; }
	@touch $@

demo: system-packages venv
	@KEEL_DEV=1 $(BIN)/python examples/demo.py

lint: venv
	@$(BIN)/ruff check --config python/pyproject.toml python bench examples conformance
	@$(BIN)/ruff format --check --quiet --config python/pyproject.toml python bench examples conformance

typecheck: venv
	@cd python && ../$(BIN)/mypy

pytest: venv
	@cd python && ../$(BIN)/pytest $(PYTEST_ARGS)

test: system-packages venv
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory typecheck
	@$(MAKE) --no-print-directory pytest

# bench/mesh compares with NATS JetStream when it finds `nats-server` (Debian:
# apt-get install nats-server) and nats-py (.venv/bin/pip install nats-py);
# without them it skips those rows and says so. The bench installs nothing.
bench: venv
	@for b in bench/*/run.py; do echo "== $$b"; $(BIN)/python "$$b"; done

clean:
	rm -rf $(VENV) .keel
