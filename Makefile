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

# Says what it does: a first setup takes a while (pip prints its own progress).
$(STAMP): requirements.txt
	@echo "setup: creating the virtualenv $(VENV)/ with $$($(PYTHON) -V 2>&1)"
	$(PYTHON) -m venv $(VENV)
	@echo "setup: installing $$(grep -c '^[A-Za-z]' requirements.txt) pinned packages from requirements.txt into $(VENV)/"
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PY) -m pip install --progress-bar on -r requirements.txt
	touch $@
	@echo "setup: $(VENV)/ ready"

# Generated code is never committed: it is made from protos/ in every build
# path (here, in the Nix build and in the Dockerfile), so it cannot go stale.
proto: $(PB)/__init__.py

$(PB)/__init__.py: $(PROTOS) scripts/genproto.py $(STAMP)
	@echo "setup: generating the gRPC/protobuf modules of protos/ into $(PB)/"
	$(PY) scripts/genproto.py protos $(PB)

# Everything CI runs: unit tests (raft, storage, interop, devnet simulators,
# packaging), then the service tests -- tests/service imports consensus.py,
# which monkey-patches the process with gevent, so it gets a pytest process of
# its own -- then the integration scenarios on real processes.
test: setup
	$(PY) -m pytest -q tests --ignore=tests/service --durations=10
	$(PY) -m pytest -q tests/service --durations=5
	DEVNET_INTEGRATION=1 $(PY) -m pytest -q tests/integration --durations=5

lint: setup
	$(PY) -m ruff check .

# One node from example/config.toml (its WAL and snapshots go to ./raft-data-dir/,
# which .gitignore ignores); it expects a network and a controller on 50000/50004.
run: setup
	$(PY) consensus.py run -c example/config.toml --stdout

clean:
	rm -rf $(PB) .pytest_cache .ruff_cache

# proposals/s of all-etcd, all-Python and mixed 3-node clusters under the etcd
# oracle's router (builds the oracle into tmp/ first; see tests/interop/)
.PHONY: bench-interop
bench-interop: setup
	$(PY) scripts/bench_interop.py

# devnet scenarios on real consensus.py processes (tests/integration; also run by CI)
.PHONY: integration
integration: setup
	DEVNET_INTEGRATION=1 $(PY) -m pytest -q tests/integration

# a live 3-node devnet (real consensus.py); Ctrl-C or DURATION=<s> ends it
.PHONY: demo
demo: setup
	$(PY) -m devnet demo --nodes 3 $(if $(DURATION),--duration $(DURATION)) $(if $(KEEP),--keep)

# service benchmark on devnets: blocks/s, latency, failover, CPU/RSS, start-up;
# prints a table, writes bench-results/bench_service.json
.PHONY: bench
bench: setup
	$(PY) scripts/bench_service.py

# random faults on a 4-node devnet, then heal and check (not in CI); MINUTES=5 SEED=n
.PHONY: chaos
chaos: setup
	$(PY) -m devnet.chaos --nodes 4 --minutes $(or $(MINUTES),5) $(if $(SEED),--seed $(SEED))

# WAL/DiskStorage durability cost: durable appends at batch 1/16/256 vs the raw
# os.fsync rate, and recovery time of 100,000 entries (prints figures)
.PHONY: bench-wal
bench-wal: setup
	$(PY) scripts/bench_wal.py

# long storage soak (not in CI): many SIGKILLs of a writing child and many
# random DiskStorage/MemoryStorage sequences; ITERATIONS=n SEED=n
.PHONY: soak-wal
soak-wal: setup
	seed=$(or $(SEED),$$(date +%s)); echo "soak-wal: CRASH_SEED=$$seed"; \
	CRASH_ITERATIONS=$(or $(ITERATIONS),5000) CRASH_SEED=$$seed DISK_PROPERTY_SEEDS=500 DISK_TORN_SEEDS=1000 \
		$(PY) -m pytest -q tests/test_crash.py tests/test_disk.py

# raft core throughput on 3- and 5-node in-memory clusters (prints figures; WIRE=1 serializes messages)
.PHONY: bench-raft
bench-raft: setup
	$(PY) scripts/bench_raft.py $(if $(WIRE),--wire)

# packaging checks alone (Nix files against the stub nixpkgs, pip replay, probe,
# Dockerfile lint; also part of `make test`); `make image` needs a Docker engine
.PHONY: packaging image docker-replay
packaging: setup
	$(PY) -m pytest -q tests/test_packaging.py

# the Dockerfile's build steps run on this host under a temp root (no engine needed;
# two venvs, not in CI): checks consensus -V/git and both probe names
docker-replay: setup
	$(PY) docker/replay_build.py $(if $(GIT_HASH),--git-hash $(GIT_HASH))

image:
	docker build --build-arg GIT_HASH=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) \
		-t $(or $(IMAGE),citacloud/consensus_raft:py) .

# randomized Raft simulation soak (not in CI): SEEDS seeds from START on STORAGE
# (memory|disk) with JOBS processes, every fault included (lost state: wipes, damaged
# synced WAL tails, wipes right after a vote; the fsync shortcut); then, unless
# DISK_SEEDS=0, DISK_SEEDS (default 500) seeds on DiskStorage, whose lost-state faults
# damage real WAL files. A failure prints the command that replays it. NO_PROTECT=1 runs
# nodes that lost state without the vote rule (expect failures: docs/internals.md).
.PHONY: soak
soak: setup
	$(PY) -m tests.sim --soak $(or $(SEEDS),10000) --start $(or $(START),0) --storage $(or $(STORAGE),memory) --jobs $(or $(JOBS),2) $(if $(NO_PROTECT),--no-protect)
	@if [ "$(or $(DISK_SEEDS),500)" != 0 ] && [ "$(or $(STORAGE),memory)" = memory ]; then \
		$(PY) -m tests.sim --soak $(or $(DISK_SEEDS),500) --start 100000 --storage disk --jobs $(or $(JOBS),2) $(if $(NO_PROTECT),--no-protect); fi

# interop soak (not in CI): the randomized mixed etcd/Python cluster test with
# SEEDS seeds x STEPS router rounds per layout
.PHONY: soak-interop
soak-interop: setup
	INTEROP_SOAK_SEEDS=$(or $(SEEDS),30) INTEROP_SOAK_STEPS=$(or $(STEPS),1500) \
		$(PY) -m pytest -q tests/test_interop.py -k randomized

# the whole `make test` RUNS times in a row (default 10) beside BURNERS CPU-bound
# processes (default 2): proves the suite waits on conditions, not on speed.
# Stops at the first failure; logs in tmp/test-loaded/
.PHONY: test-loaded
test-loaded: setup
	$(PY) scripts/test_loaded.py --runs $(or $(RUNS),10) --burners $(or $(BURNERS),2)

# crash-state explorer of raft/ storage (tests/crash_explore; CI runs a sampled
# variant in tests/test_crash_explore.py): every operation boundary of the storage
# workloads under a process crash and a power loss, every sector cut, crashes
# during recovery too; prints the states checked per model. SEED=n for the sampling
.PHONY: crash-explore
crash-explore: setup
	$(PY) -m tests.crash_explore --full $(if $(SEED),--seed $(SEED))

# seeded fuzzer of the storage decoders (WAL, snapshot files, Rust import) with random
# damage: every input must recover or be refused with CorruptLog (CI runs 5,000 inputs
# in tests/test_fuzz_storage.py). INPUTS=n (default 100,000) SEED=n
.PHONY: fuzz-storage
fuzz-storage: setup
	$(PY) -m tests.fuzz_storage --inputs $(or $(INPUTS),100000) --seed $(or $(SEED),1)

# every fuzzer's long variant (not in CI, where each runs a short one): INPUTS (default
# 100,000) raft messages into RawNode.step of in-memory clusters, damaged storage files,
# and NetworkMsg/Reconfigure/CheckBlock requests against a live devnet node. SEED=n
.PHONY: fuzz
fuzz: setup
	RAFT_FUZZ_INPUTS=$(or $(INPUTS),100000) $(if $(SEED),RAFT_FUZZ_SEED=$(SEED)) \
		$(PY) -m pytest -q -s tests/test_raft_fuzz.py
	$(PY) -m tests.fuzz_storage --inputs $(or $(INPUTS),100000) --seed $(or $(SEED),1)
	DEVNET_INTEGRATION=1 FUZZ_GRPC_INPUTS=$(or $(INPUTS),100000) FUZZ_SEED=$(or $(SEED),1) \
		$(PY) -m pytest -q -s tests/integration/test_grpc_fuzz.py
