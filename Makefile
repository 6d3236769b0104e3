# podnet: `make demo` and `make test` on a fresh Debian 12 machine, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the demo and the tests use: ip(8), iptables-restore, ping, curl, iperf3, ps, nsenter
DEBS := iproute2 iptables iputils-ping curl iperf3 procps util-linux
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean setup debs

setup: debs $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

demo: setup
	$(PY) examples/demo/run.py

test: setup
	PODNET_REQUIRE_ROOT_TESTS=1 $(PY) -m pytest -q

# PODNET_BENCH_REPORT=1: bench/conftest.py writes bench/results/<UTC timestamp>/ (report.md, results.json,
# plots) and points bench/results/latest at it; `make test` leaves it unset and writes nothing.
# `make bench` is the quick profile (100, 1,000 and 10,000 Services); `make bench FULL=1` the full one
# (adds 50,000 Services and the kernel's slow nf_tables loads: expect well over half an hour)
FULL ?=
bench: setup
	@before=$$(readlink bench/results/latest 2>/dev/null || true); rc=0; \
	PODNET_BENCH_FULL=$(if $(filter 1 yes true,$(FULL)),1,0) PODNET_BENCH_REPORT=1 $(PY) -m pytest bench -q --benchmark-only --benchmark-group-by=group \
	  --benchmark-columns=min,median,mean,ops,rounds || rc=$$?; \
	if [ "$$(readlink bench/results/latest 2>/dev/null || true)" != "$$before" ]; then \
	  echo "report: $$(readlink -f bench/results/latest)/report.md"; \
	else echo "no report written (no benchmark ran)"; fi; \
	exit $$rc

clean:
	-@[ -x $(PY) ] && $(PY) -m podnet.cli clean || true
	rm -rf .pytest_cache .benchmarks build src/*.egg-info
