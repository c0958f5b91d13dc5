# visabus — `make run` starts the demo rack, `make test` runs everything from a bare machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install system-deps run demo test test-fast bench lint clean

# The venv is (re)built when pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-venv; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $(STAMP)

install: $(STAMP)

# iproute2 gives the network-namespace tests their `ip`; installed only where we are root and it is missing.
system-deps:
	@if ! command -v ip >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq iproute2) || echo "iproute2 unavailable: netns tests will skip"; fi

run: install
	$(VENV)/bin/visabus serve configs/demo.toml

demo: install
	$(PY) scripts/demo.py

test: install system-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q tests/unit

# glibc keeps large freed blocks for reuse (for every process of the run, PyVISA-py's and the bus's alike):
# otherwise each 64 MiB result is a fresh mmap whose first-touch page faults cost as much as the transfer.
bench: install
	GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824 \
	  $(PY) bench/run.py --output docs/BENCHMARKS.md

lint: install
	$(VENV)/bin/ruff check broker workers sdk sim tests bench scripts
	$(VENV)/bin/mypy broker workers sdk sim

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
