# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# DeepSpeed compiles its CPU ops (shm_comm, cpu_adam) on first use; keep them per environment so
# two checkouts on one machine do not keep invalidating each other's build.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test test-gpu test-multinode demo bench bench-quick clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

test: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -ra tests

test-gpu: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -ra -m gpu tests

# The loopback multi-node launch alone (make test includes it): sshd on 127.0.0.2/127.0.0.3.
test-multinode: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -ra tests/launch/test_multinode.py

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

# Regenerate BENCHMARKS.md (hours on 2 cores; `make bench SECTION=reshard` for one section), or
# check on tiny shapes that every benchmark still runs (`make bench-quick`, BENCHMARKS.md untouched).
bench: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/run.py $(if $(SECTION),--section $(SECTION))

bench-quick: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) benchmarks/run.py --quick $(if $(SECTION),--section $(SECTION))

clean:
	rm -rf runs/demo data/sample
