# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RP_HOME ?= $(CURDIR)/.rp
export RP_HOME
# Dagster's own instance (runs, events, schedules) for local use lives beside the data.
DAGSTER_HOME ?= $(RP_HOME)/dagster
export DAGSTER_HOME
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
PYTEST_ARGS ?=

.PHONY: setup demo test dev serve bench rehearsal drill clean

$(BIN)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(PYTHON)" "$(VENV)"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/research-pipeline demo

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

dev: setup
	mkdir -p "$(DAGSTER_HOME)"
	test -f "$(DAGSTER_HOME)/dagster.yaml" || cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	$(BIN)/dagster dev -w workspace.yaml

serve: setup
	$(BIN)/research-pipeline serve --port 8080

bench: setup
	$(BIN)/python -m bench.run_all

# The production topology on loopback, exercised (migration, reindex, backfill, 1x/10x load),
# stopped; its JSON summary is the last line (figures in docs/BENCHMARKS.md). --smoke: make test's.
rehearsal: setup
	nice -n 5 $(BIN)/python -m bench.rehearsal $(REHEARSAL_ARGS)

# Disaster-recovery and fault drills (restores, failover, S3 503s, disk full, PostgreSQL restart mid-reindex; docs/RELIABILITY.md); JSON summary last.
drill: setup
	nice -n 5 $(BIN)/python -m bench.drill $(DRILL_ARGS)

clean:
	rm -rf "$(RP_HOME)"
