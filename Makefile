# The README's commands. Each creates .venv/ from the pinned requirement files when missing.
#   make fire [INVENTORY=inventory/aws.yml] [ARGS='-e cluster_max_workers=8']
#   make teardown [INVENTORY=...]
#   make test
#   make bench
#   make lint
PYTHON ?= python3
VENV := .venv
INVENTORY ?= inventory/local.yml
ARGS ?=
BIN := $(CURDIR)/$(VENV)/bin
# Ansible's tools call each other by name: the venv's bin must come first on PATH.
RUN := PATH="$(BIN):$$PATH" ANSIBLE_CONFIG="$(CURDIR)/ansible.cfg"

.PHONY: fire teardown test lint bench clean

fire: $(VENV)/.run-deps
	$(RUN) ansible-playbook -i $(INVENTORY) playbooks/fire.yml $(ARGS)

teardown: $(VENV)/.run-deps
	$(RUN) ansible-playbook -i $(INVENTORY) playbooks/teardown.yml $(ARGS)

test: $(VENV)/.test-deps
	$(RUN) python -m pytest tests $(ARGS)

lint: $(VENV)/.test-deps
	$(RUN) ansible-lint --profile production

# Benchmarks (see the README): the peer (rq, redis), the plot (matplotlib) and the profiler
# (py-spy) into the venv; redis-server and wrk from Debian when run as root. Without wrk the
# bench falls back to Python load processes.
bench: $(VENV)/.bench-deps
	$(RUN) python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV)

# A Debian without python3-venv can't create a venv with pip in it: install the package
# when we can (root with apt), say what to do otherwise.
$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON) is older)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
		else echo "cannot create a venv: install python3-venv (sudo apt-get install python3-venv)"; exit 1; fi; }
	$(VENV)/bin/pip install -q --upgrade pip

# Also installs the command-line client as .venv/bin/dynamic-workload.
$(VENV)/.run-deps: requirements.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements.txt
	printf '#!/bin/sh\nPYTHONPATH="%s/services" exec "%s/python" -m dynamic_workload "$$@"\n' "$(CURDIR)" "$(BIN)" \
		> $(VENV)/bin/dynamic-workload
	chmod +x $(VENV)/bin/dynamic-workload
	touch $@

# Debian packages the tests drive: curl (as users do), Chromium and its driver (the dashboard),
# systemd-analyze (the units the roles render).
TEST_PACKAGES := curl chromium chromium-driver systemd
TEST_COMMANDS := curl chromium chromedriver systemd-analyze

$(VENV)/.test-deps: requirements.txt requirements-test.txt | $(VENV)/bin/python
	@missing=$$(for c in $(TEST_COMMANDS); do command -v $$c >/dev/null || echo $$c; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(TEST_PACKAGES) for: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_PACKAGES) >/dev/null; \
		else echo "the tests need: $$missing (sudo apt-get install $(TEST_PACKAGES))"; exit 1; fi; \
	fi
	$(VENV)/bin/pip install -q -r requirements-test.txt
	$(MAKE) --no-print-directory $(VENV)/.run-deps
	touch $@

BENCH_PACKAGES := redis-server wrk

$(VENV)/.bench-deps: bench/requirements.txt requirements.txt | $(VENV)/bin/python
	@if ! command -v redis-server >/dev/null || ! command -v wrk >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing $(BENCH_PACKAGES)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_PACKAGES) >/dev/null; \
		elif ! command -v redis-server >/dev/null; then \
			echo "the bench needs redis-server (sudo apt-get install $(BENCH_PACKAGES))"; exit 1; \
		else echo "wrk is missing: the bench will use Python load processes (sudo apt-get install wrk)"; fi; \
	fi
	$(VENV)/bin/pip install -q -r bench/requirements.txt
	$(MAKE) --no-print-directory $(VENV)/.run-deps
	touch $@
