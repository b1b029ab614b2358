# failoverd developer entry points. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: help install system-deps demo ml-demo typecheck test test-unit kafka-up kafka-down kafka-status bench bench-quick bench-failover bench-peers bench-deps clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

# uv (a runtime dependency already: it builds the releases' environments) installs the rest: it
# downloads and unpacks in parallel, ~10x faster than pip on a fresh machine (~10 s against ~95 s).
# It reads the TLS roots of the system (--system-certs), as pip does with the machine's PIP_CERT.
UV := $(BIN)/uv pip install -q --system-certs --python $(BIN)/python

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(UV) -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)  ## create .venv and install failoverd with its test extra

system-deps:  ## install the system tools the tests need (java, maven, promtool, systemd-analyze) via apt
	@PYTHON=$(PYTHON) bash deploy/ci-system-deps.sh

demo: $(STAMP)  ## run the demo on the local broker (starts it if needed)
	$(BIN)/failoverd kafka up
	$(BIN)/failoverd demo

ml-demo: $(STAMP)  ## the demo with real ML releases: ONNX Runtime active, scikit-learn standby, own envs
	$(BIN)/failoverd kafka up
	$(BIN)/failoverd demo --ml --records 6000

# Types: mypy over all of daemon/ with pyproject.toml's [tool.mypy] (--strict for engine/,
# failover/, bundle/ and the modules listed there).
typecheck: $(STAMP)  ## type-check daemon/ with mypy (pyproject.toml [tool.mypy])
	$(BIN)/mypy daemon

# The system tools come first: `python3 -m venv` itself needs Debian's python3-venv.
# Two parts: the tests not marked serial on two workers, then the serial ones (they restart or kill
# the broker the others share; tests/conftest.py).
# The brokers and registries the tests start run the client JIT only (FAILOVERD_JAVA_OPTS,
# daemon/localservice.py): half the broker's CPU, which the tests share on two cores.
test test-unit: export FAILOVERD_JAVA_OPTS ?= -XX:TieredStopAtLevel=1

test: system-deps $(STAMP)  ## type-check, then run the whole test suite against the local broker (installs tools, starts it)
	$(MAKE) --no-print-directory typecheck
	$(BIN)/failoverd kafka up
	$(BIN)/python -m pytest tests -m "not serial" -n 2 --dist loadgroup --durations=25
	$(BIN)/python -m pytest tests -m serial --durations=10

test-unit: system-deps $(STAMP)  ## unit tests only (no broker)
	$(BIN)/python -m pytest tests -m "not integration" --durations=25

kafka-up: $(STAMP)  ## start the local single-node KRaft broker on 127.0.0.1:9092
	$(BIN)/failoverd kafka up

kafka-down: $(STAMP)  ## stop the local broker
	$(BIN)/failoverd kafka down

kafka-status: $(STAMP)  ## is the local broker up, and where
	$(BIN)/failoverd kafka status

bench-deps: $(STAMP)
	$(UV) -e '.[test,bench]'

# Every throughput table of docs/BENCHMARKS.md (bench/run_all.py): 30 s steady windows, 3 interleaved
# rounds per script. The schema registry is for bench/formats.py (Avro).
bench: bench-deps  ## every throughput table, 30 s windows x 3 rounds (~2.5 h; rewrites docs/BENCHMARKS.md)
	$(BIN)/failoverd kafka up
	$(BIN)/failoverd schema-registry up
	$(BIN)/python bench/run_all.py

bench-quick: bench-deps  ## every throughput table with --quick: small windows, 1 round (~15 min; review only, no doc)
	$(BIN)/failoverd kafka up
	$(BIN)/failoverd schema-registry up
	$(BIN)/python bench/run_all.py --quick

bench-failover: bench-deps  ## failover time per standby mode vs a rebalance
	$(BIN)/failoverd kafka up
	$(BIN)/python bench/failover.py

bench-peers: bench-deps  ## failoverd vs Quix Streams vs faust-streaming vs a plain loop
	$(BIN)/failoverd kafka up
	$(BIN)/python bench/peers/run.py

clean:  ## remove the venv and local broker data
	-$(BIN)/failoverd kafka down
	rm -rf $(VENV) .local
