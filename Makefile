# podnet: `make demo` and `make test` on a fresh Debian 12 machine, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the demo and the tests use: ip(8), iptables-restore, ping, curl, iperf3, ps, nsenter,
# etcd-server for /usr/bin/etcd (v3.4): the store's tests start their own etcd on loopback ports,
# and tshark: the overlay tests check that it decodes our underlay captures as VXLAN
DEBS := iproute2 iptables iputils-ping curl iperf3 procps util-linux etcd-server tshark
STAMP := $(VENV)/.installed
# etcd-server's postinst enables etcd.service and starts it (a system etcd on 127.0.0.1:2379, and on
# every boot after). We want only the binary, so when `make` is the one installing the package it masks
# the unit first (what `systemctl mask` does; the postinst's unmask only lifts masks the packaging made
# itself), so systemd neither starts it now nor at boot; `systemctl unmask etcd` undoes this. Without
# systemd (sysvinit, containers) the install's invoke-rc.d start obeys policy-rc.d; whether or not it ran,
# the init script is then disabled, and the etcd it started is ended by its pidfile (not by
# `/etc/init.d/etcd stop`, which also ends every other /usr/bin/etcd on the machine). An etcd-server
# installed before is left as it is.
ETCD_NO_SERVICE_BEFORE := mkdir -p /etc/systemd/system; \
	  [ -e /etc/systemd/system/etcd.service ] || ln -s /dev/null /etc/systemd/system/etcd.service
ETCD_NO_SERVICE_AFTER := if [ ! -d /run/systemd/system ] && [ -x /etc/init.d/etcd ]; then \
	  update-rc.d etcd disable >/dev/null 2>&1; \
	  [ ! -s /run/etcd.pid ] || start-stop-daemon --stop --quiet --retry TERM/5/KILL/5 \
	  --pidfile /run/etcd.pid --exec /usr/bin/etcd; rm -f /run/etcd.pid; true; fi

.PHONY: demo test bench clean setup debs

setup: debs $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do [ "$$(dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null)" = installed ] \
	  || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  case " $$missing " in *" etcd-server "*) $(ETCD_NO_SERVICE_BEFORE) ;; esac; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	  case " $$missing " in *" etcd-server "*) $(ETCD_NO_SERVICE_AFTER) ;; esac; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,etcd]'
	touch $@

demo: setup
	$(PY) examples/demo/run.py

test: setup
	PODNET_REQUIRE_ROOT_TESTS=1 $(PY) -m pytest -q

# PODNET_BENCH_REPORT=1: bench/conftest.py writes bench/results/<UTC timestamp>/ (report.md, results.json,
# plots) and points bench/results/latest at it; `make test` leaves it unset and writes nothing.
# `make bench` is the quick profile (100, 1,000 and 10,000 Services); `make bench FULL=1` the full one
# (adds 50,000 Services and the kernel's slow nf_tables loads up to 10,000: about 20 minutes on 2 cores)
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
