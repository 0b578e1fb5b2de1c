# Everything a developer or CI runs goes through these targets.
# `make setup` is idempotent: it creates .venv, installs requirements.txt and
# generates the protobuf code; every other target depends on it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PB     := cita_raft_pb
PROTOS := $(wildcard protos/*.proto)
STAMP  := $(VENV)/.installed

.PHONY: setup proto test lint run clean

setup: $(STAMP) $(PB)/__init__.py

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Generated code is never committed: it is made from protos/ in every build
# path (here, in the Nix build and in the Dockerfile), so it cannot go stale.
proto: $(PB)/__init__.py

$(PB)/__init__.py: $(PROTOS) scripts/genproto.py $(STAMP)
	$(PY) scripts/genproto.py protos $(PB)

# tests/service imports consensus.py, which monkey-patches the process with
# gevent; it runs in a pytest process of its own.
test: setup
	$(PY) -m pytest -q tests --ignore=tests/service
	$(PY) -m pytest -q tests/service

lint: setup
	$(PY) -m ruff check .

run: setup
	$(PY) consensus.py run -c example/config.toml --stdout

clean:
	rm -rf $(PB) .pytest_cache .ruff_cache

# proposals/s of all-etcd, all-Python and mixed 3-node clusters under the etcd
# oracle's router (builds the oracle into tmp/ first; see tests/interop/)
.PHONY: bench-interop
bench-interop: setup
	$(PY) scripts/bench_interop.py
